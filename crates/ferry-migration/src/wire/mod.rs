//! The migration stream's byte formats: every byte either side puts on a socket.
//!
//! # Shape of a migration
//!
//! One main channel, a byte stream (TCP or a unix socket). The source writes the forward
//! stream; the destination answers on the same connection (the *return path*).
//!
//! ```text
//!  source                                              destination
//!    | StreamHeader (16 bytes, fixed forever)                |
//!    | Hello: release, machine type, wire properties,        |
//!    |        RAM layout, vCPU and device state versions ---> | checks all of it
//!    | <----------------------------- Accept | Refuse(cause) | before any RAM moves
//!    | RamBatch* PassEnd   (pass 0: every populated page)     |
//!    | RamBatch* PassEnd   (pass k: pages dirtied since k-1)  |
//!    |   ... until pending bytes fit the downtime limit ...  |
//!    | (vCPUs stopped)                                       |
//!    | RamBatch* PassEnd   (final pass)                       |
//!    | DeviceState* VcpuState*                               |
//!    | EndOfStream: digest of guest memory  ---------------> | loads, verifies, resumes
//!    | <------------------------- Completed | LoadFailed(why) |
//! ```
//!
//! The source may send `Abort(reason)` at any point instead of going on; the destination
//! may send `LoadFailed(reason)` at any point and close. Neither side ever waits for a
//! message the other will not send: every wait has a peer-closed or timeout exit.
//!
//! # Who runs the guest when something breaks
//!
//! Until the source reads `Completed`, the guest belongs to the source: on any error,
//! refusal, abort or cancel the source resumes it (if it was running) and the
//! destination never starts it. The destination starts the guest only after the end of
//! stream has arrived, every device and vCPU state has loaded exactly once and the
//! digest matched; then it sends `Completed`. One window remains, as in every
//! two-party protocol: once the end of stream has gone out, a silent destination may
//! already be running the guest. So if the connection then breaks or times out without
//! a `LoadFailed`, the source reports the failure but leaves the guest stopped, saying
//! so: management checks the destination before it resumes the source (`cont`).
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
mod multifd;
#[cfg(test)]
mod proptests;

pub use codec::{Reader, WireError, Writer};
pub use messages::*;
pub use multifd::*;
