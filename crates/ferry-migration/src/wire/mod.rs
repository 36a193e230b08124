//! The migration stream's byte formats: every byte either side puts on a stream.
//!
//! # Shape of a migration
//!
//! One main channel, a byte stream the embedder hands the engine (TCP, a unix socket,
//! TLS, ...: see [`crate::engine::transport`]). The source writes the forward
//! stream; the destination answers on the same connection (the *return path*). Pages
//! travel on N data channels of their own (multifd, N = the hello's `channels`), or on
//! the main channel when N is 0.
//!
//! ```text
//!  source                                              destination
//!    | StreamHeader (16 bytes, fixed forever)                |
//!    | Hello: release, machine type, wire properties,        |
//!    |        RAM layout, vCPU and device state versions,    |
//!    |        data channels and compression,                 |
//!    |        precopy offers (annotations)  ---------------> | checks all of it
//!    | <----------------------------- Accept | Refuse(cause) | before any RAM moves
//!    | <------------------------------------- DevicePlan     | (switchover-ack on)
//!    | data channel i: ChannelHeader(session, i, N)  ------> | binds it by its header
//!    | <------------------------------------ ChannelsReady   | all N bound
//!    | PopulatedExtents*: where guest memory is populated    | faults it in ahead
//!    |   (migration.x-ferry-populate-ahead on)  -----------> | of the pages
//!    | pass 0: every populated page, as packets on the data channels,
//!    |         MultifdSync(s) (per pass, or per section on ferry-0.1), PassEnd
//!    |         DevicePrecopy* (devices the plan precopies), and once a device's
//!    |         initial data is out, PrecopyInitDone(dev) ---> | loaded: acknowledges
//!    | <---------------------------------- SwitchoverAck(dev)  |
//!    | pass k: the pages dirtied since pass k-1, likewise, and what the devices changed
//!    |   ... until pending bytes fit the downtime limit and every device is acked ...
//!    | (vCPUs stopped)                                       |
//!    | final pass, MultifdSync(s, last), PassEnd             |
//!    | DevicePrecopy* (what the devices still have)          |
//!    | DeviceState* VcpuState*                               |
//!    | StateDigest (state-digest on)                         |
//!    | EndOfStream: digest of guest memory  ---------------> | loads, verifies, resumes
//!    | <------------------------- Completed | LoadFailed(why) |
//! ```
//!
//! Between any two frames either way, a side may send a [`Keepalive`] (the source's
//! [`FrameTag::Keepalive`], the destination's [`FrameTag::KeepaliveReturn`]) once both
//! have said they take them: the source with the hello annotation [`LIVENESS`], the
//! destination with its first keepalive right after its answer (see
//! `engine::liveness`). Releases 0.1.0 and 0.2.0 send and get none.
//!
//! With N = 0 the pages go as `RamBatch` frames on the main channel instead and there
//! are no channel headers, `ChannelsReady` or syncs. On machine type `ferry-0.1`
//! (`switchover-ack` and `state-digest` off) there is no device plan, no precopy, no
//! acknowledgement and no state digest: the stream is release 0.1.0's.
//!
//! # Device precopy and the switchover acknowledgement
//!
//! Whether a device's state can move while the guest runs depends on the host (VFIO's
//! `VFIO_MIGRATION_PRE_COPY` is a flag of the host's driver), so two hosts of one
//! release may disagree, device by device. The rule is that nobody waits for a message
//! the other side will never send:
//!
//! * The hello offers precopy for each device the source's host can precopy, naming the
//!   schema and version of its precopy records ([`PrecopyOffer`]). Offers are hello
//!   annotations, so a release that knows none ignores them.
//! * `migration.switchover-ack` is a wire property, so both sides have it on or both off.
//!   With it on, the destination answers the accept with a [`DevicePlan`]: a mode for
//!   each device of the hello, in its order: [`DeviceMode::Precopy`] exactly where the
//!   source offered and the destination's host can load those records, stop-copy with
//!   the reason ([`StopCopyWhy`]) everywhere else.
//! * For a planned device the source sends [`FrameTag::DevicePrecopy`] records (a
//!   [`DeviceStateHeader`] and one state of the device's precopy schema) while the guest
//!   runs; when the device reports no initial data left, [`FrameTag::PrecopyInitDone`]
//!   names it. The destination loads records as they come, so on that marker it
//!   answers [`FrameTag::SwitchoverAck`] for the device: one acknowledgement per planned
//!   device, counted by the source (the seed thread's "switchover_pending" kept at the
//!   source, as its last mail proposes), never one count that a device the destination
//!   cannot precopy would hold up.
//! * The source stops the guest only when RAM and every device's stop-copy estimate fit
//!   the downtime limit and every planned device is acknowledged; a missing
//!   acknowledgement fails the migration after a bound, the guest running on. After the
//!   stop, the rest of each planned device's records, then every device's final state.
//!   The destination refuses a record of a device planned stop-copy, a record after the
//!   device's final state, a final state before the device's marker, and a marker twice.
//!
//! Release 0.1.0 has neither property (a 0.2 hello on `ferry-0.1` carries them with the
//! compat tables' value, off), so with it every device moves as stop-copy, as 0.1.0
//! moves them.
//!
//! # Integrity of device and vCPU state
//!
//! With `migration.state-digest` on (from `ferry-0.2`), the last frame before the end of
//! stream is a [`StateDigest`]: xxh3-64 over the payload of every device-state,
//! precopy-record and vCPU-state frame, in stream order, which the destination
//! recomputes as it reads them and compares before it resumes the guest. A byte
//! changed in a state value that still decodes (a counter, a register) is caught, as the
//! memory digest catches a changed page.
//!
//! # Data channels and the sync rule
//!
//! A data channel carries only packets (see [`multifd`]):
//! up to 128 pages of one RAM block each, zero pages as offsets without data. Packets of
//! different channels arrive in any order relative to each other, so a page sent twice,
//! once on each of two channels, could land old-after-new. The *sync* forbids that: sync
//! `s` is a sync packet with number `s` on every data channel, after every page packet
//! the source put before it, plus `MultifdSync(s)` on the main channel. The destination
//! applies nothing that follows sync `s` on any channel until every channel has reached
//! `s` and the main channel has announced it. The source never puts two copies of a page
//! between the same two syncs.
//!
//! **Where the syncs go is the `migration` property `multifd-flush-after-each-section`**
//! (QEMU's name and meaning), a wire property the hello carries, so both sides agree on
//! it before any RAM moves:
//!
//! * `on`, release 0.1's rule and the value of machine type `ferry-0.1`: a sync after
//!   every section and at the end of every pass. A section is the engine's unit of
//!   sending, about 100 ms; the pass end closes the last section of the pass.
//! * `off`, the default from `ferry-0.2` on: one sync at the end of every pass. A pass
//!   sends each page at most once, so that is all the barrier needs; on a fast link the
//!   section syncs only made every channel drain ten times a second (QEMU made the same
//!   change in 8.0).
//!
//! Syncs are numbered from 1 without gaps; the one that ends the final pass has `last`
//! set, is each channel's last packet, and must come before the device state. The
//! destination obeys syncs wherever they are and checks their numbering, that the last
//! one came, and, under the once-per-pass rule, that no pass has two. A 0.1.0 peer
//! does not know the property: on `ferry-0.1` its value comes from the machine type's
//! compat table, which is the rule 0.1.0 follows, so the two still migrate (see
//! [`crate::compat`]).
//!
//! # Who runs the guest: the handover
//!
//! At every instant exactly one side may run the guest. The handover is a small state
//! machine on each side ([`crate::engine::Handover`] names its states and the monitor
//! reports them); only the messages below move it on.
//!
//! ```text
//!  source                                       destination
//!  ──────                                       ───────────
//!  Source: may run the guest.                   Source: never runs the guest.
//!    any error, refusal, cancel, abort:           any error, cancel, abort: the guest
//!    resume (if it ran), harvested dirty bits     stays stopped; LoadFailed(why) to the
//!    put back, Abort(why) to the destination      source (before the end of stream)
//!    │ guest stopped, final pass, state sent,       │
//!    │ no cancel taken, peer has not hung up        │ EndOfStream arrives: every state
//!    ▼ (the commit: a cancel and the commit are     │ loaded once, digests match, no
//!  Committed     decided under one lock)            │ cancel taken (the commit here)
//!    │ EndOfStream went out whole                   ▼
//!    ├─ Completed ──────────> Destination         Destination: resumes the guest, then
//!    ├─ LoadFailed(why) ────> Source (resume:     sends Completed (a source that keeps
//!    │                        the destination     the commitment); or sends Completed
//!    │                        says it did not     and resumes once the source lets go
//!    │                        start the guest)    (a source that does not: 0.1.0): it
//!    └─ silence, a broken ──> InDoubt: stopped    closes, or a short grace passes; an
//!       link, anything else   here; says so; a    Abort there means it took the guest
//!                             user who checked    back, and it is not started here
//!                             the destination
//!                             takes it back
//! ```
//!
//! Rules that follow:
//! * A cancel is taken only while the source is in `Source`; taken, it always wins
//!   (the source does not commit after it). In `Committed` it is refused with the
//!   reason. `cont` and `stop` during the switchover are refused at the VMM.
//! * If the end of stream cannot be written whole, the rest never left the host, so no
//!   destination can have decoded it: the source goes back to `Source` and resumes.
//! * After the commit the source sends no abort: the destination decides.
//! * A source states in its hello that it keeps this commitment (an annotation, see
//!   [`Annotations`]); release 0.1.0 did not keep it (it resumed its guest when
//!   cancelled after the end of stream), so a destination that reads no such statement
//!   answers `Completed` first and resumes only once the source has let go (closed, or
//!   sent no abort within a short grace).
//! * One window remains, as in every two-party protocol: after the end of stream a
//!   silent destination may already run the guest, so the source then stays stopped
//!   (`InDoubt`) and management checks the destination before taking it back.
//!
//! # Encoding rules
//!
//! * All integers are little-endian, written and read one field at a time: nothing is a
//!   `repr(C)` struct cast onto bytes, so no layout or endianness leaks across hosts.
//! * [`StreamHeader`] is 16 bytes (magic, protocol version, header length) and never
//!   changes shape, so any release can read it and refuse a version it does not speak.
//! * After the header everything is a frame: an 8-byte [`FrameHeader`] (tag, three zero
//!   bytes, payload length) followed by the payload. The receiver checks the length
//!   against the limit for that tag ([`FrameTag::max_len`]) before reading or allocating.
//! * Strings are a u16 length and UTF-8 bytes, each with its own bound.
//! * A RAM batch carries up to [`MAX_BATCH_PAGES`] page entries, then the data of the
//!   non-zero pages back to back. A zero page is a flag with no payload.
//! * Device and vCPU state payloads are produced by [`crate::state`] and bounded by the
//!   destination's schema for that device.
//!
//! # Versioning
//!
//! [`PROTOCOL_VERSION`] covers framing and message layout. Compatible additions travel
//! as new frame tags or hello fields behind a property that the hello carries, so both
//! sides agree before they are used; see [`crate::compat`]. Device state versions are a
//! separate axis ([`crate::state`]).

mod codec;
mod messages;
pub mod multifd;
#[cfg(test)]
mod proptests;

pub use codec::{Reader, WireError, Writer};
pub use messages::*;
pub use multifd::*;
