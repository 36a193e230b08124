//! Where a destination's connections come from: one handed-in channel, or an
//! [`Acceptor`] (a listener, or whatever the embedder accepts connections with) whose
//! connections are sorted by the header each one opens with.
//!
//! Every connection declares what it is in its first bytes: the main stream's
//! [`StreamHeader`] and hello frame, or a data channel's [`ChannelHeader`], each with
//! its own magic. The doorman reads them on a small thread per connection, and until a
//! connection has sent all of them it holds nothing a real source needs:
//!
//! * a connection has [`DoorConfig::handshake_timeout`] in all to send its header (and,
//!   for a main stream, its whole hello): a deadline, not a timeout per read, so a peer
//!   that trickles a byte at a time is cut like a silent one;
//! * at most [`MAX_PENDING`] connections may be identifying themselves at once: a new one
//!   beyond that evicts the oldest (a real source sends its header and hello at once, so
//!   idle connections that pile up go first), and each costs one thread with a small stack
//!   and the bytes it has actually sent, at most a hello's bound;
//! * a main stream whose hello arrived whole is a *candidate*: the destination judges its
//!   hello and refuses it (then keeps waiting) or takes it as the migration; once one is
//!   taken, a later candidate is answered `busy`, so a second source learns why;
//! * a data channel is bound only if its session id is the hello's, its channel count
//!   is the hello's, its index is in range and not yet taken, and its transport proved
//!   the same peer identity as the main channel's (a TLS client certificate's: see
//!   [`MigrationStream::peer_identity`](super::transport::MigrationStream::peer_identity));
//! * a TLS ClientHello reaching a destination that takes plaintext is answered with a
//!   refusal in plaintext (a TLS source reads it in place of the server's hello), so the
//!   source learns that this side did not ask for TLS;
//! * anything else (another magic, a wrong version, a channel for another migration or
//!   for none yet, a duplicate, silence, a trickle) is logged and closed. It never
//!   disturbs the migration under way, nor the wait for one.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::error::MigrationError;
use super::stream::write_frame;
use super::transport::{Acceptor, Channel};
use crate::wire::{
    ChannelHeader, FrameHeader, FrameTag, Refuse, RefuseCause, StreamHeader, CHANNEL_MAGIC,
    CHANNEL_VERSION, MAGIC, SUPPORTED_PROTOCOL_VERSIONS,
};

/// Connections identifying themselves at once; a new one beyond this evicts the oldest.
pub const MAX_PENDING: usize = 64;
/// Door threads alive at once: the pending ones and evicted ones still winding down.
/// At the cap the door takes no new connection (the kernel's backlog holds them) until
/// one exits, so a flood costs threads up to this and no more.
const MAX_DOOR_THREADS: usize = MAX_PENDING + 16;
/// Strays remembered for `query-migrate`: the most recent, with a count of all.
const MAX_STRAYS: usize = 256;
/// The stack of a thread reading one connection's header: it parses a few fixed fields
/// and copies bytes into a buffer on the heap.
const DOOR_STACK: usize = 128 << 10;
/// How much of a hello is read at a time, so a connection costs what it has sent.
const READ_STEP: usize = 16 << 10;

/// How the doorman treats connections.
#[derive(Clone)]
pub(crate) struct DoorConfig {
    /// How long a connection has, from its accept, to send its header and, for a main
    /// stream, its whole hello.
    pub handshake_timeout: Duration,
    /// This side's release, for the refusal of a protocol version it does not speak.
    pub release: String,
}

/// A main stream whose header and hello arrived whole, for the destination to judge.
pub(crate) struct Candidate {
    pub ch: Channel,
    pub peer: String,
    /// The hello frame's payload (bounded by its frame limit). The stream header before
    /// it named a protocol version this release speaks.
    pub hello: Vec<u8>,
}

/// The connections a destination receives a migration on.
pub enum Incoming {
    /// One connection, already accepted: the main channel only (no data channels).
    Channel(Channel),
    /// An acceptor: the main channel and the data channels all connect to it.
    Acceptor(Box<dyn Acceptor>),
}

impl Incoming {
    /// Connections from an acceptor of the embedder's.
    pub fn acceptor(a: impl Acceptor) -> Self {
        Self::Acceptor(Box::new(a))
    }
}

impl From<Channel> for Incoming {
    fn from(ch: Channel) -> Self {
        Self::Channel(ch)
    }
}

/// A stray: a connection the doorman turned away, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stray {
    pub peer: String,
    pub reason: String,
}

/// Reads a doorman's strays from elsewhere.
pub(crate) struct StrayWatch(Option<Arc<Door>>);

impl StrayWatch {
    /// When more than `known` connections were turned away in all: how many, and the
    /// most recent of them.
    pub fn since(&self, known: u64) -> Option<(u64, Vec<Stray>)> {
        let door = self.0.as_ref()?;
        let st = door.st.lock().unwrap();
        (st.strays_total > known).then(|| (st.strays_total, st.strays.clone()))
    }
}

#[derive(Default)]
struct DoorState {
    /// Main streams whose hello arrived whole, waiting for the destination to judge.
    candidates: VecDeque<Candidate>,
    /// The destination took a migration: later candidates are told it is busy.
    busy: bool,
    /// The session and channel count the hello announced.
    expect: Option<(u64, u16)>,
    /// The identity the main channel's transport proved, which every data channel must
    /// prove too.
    identity: Option<String>,
    data: Vec<Option<Channel>>,
    /// The most recent strays, [`MAX_STRAYS`] at most.
    strays: Vec<Stray>,
    /// Every connection turned away so far.
    strays_total: u64,
    closed: bool,
    /// Connections still identifying themselves, oldest first: an id, and a handle to
    /// shut one down when a newer one needs its place.
    pending: VecDeque<(u64, Channel)>,
    next_id: u64,
}

impl DoorState {
    fn stray(&mut self, s: Stray) {
        if self.strays.len() >= MAX_STRAYS {
            self.strays.remove(0);
        }
        self.strays.push(s);
        self.strays_total += 1;
    }
}

struct Door {
    st: Mutex<DoorState>,
    /// Door threads alive.
    threads: std::sync::atomic::AtomicUsize,
    cv: Condvar,
    stop: AtomicBool,
    /// An eventfd the acceptor polls beside the acceptor's descriptor, so closing wakes
    /// it at once.
    wake: Option<OwnedFd>,
    config: DoorConfig,
}

/// The connections of one incoming migration.
pub(crate) struct Doorman {
    door: Option<Arc<Door>>,
    single: Option<Channel>,
    config: DoorConfig,
    acceptor: Option<JoinHandle<()>>,
}

impl Doorman {
    pub fn new(incoming: Incoming, config: DoorConfig) -> Self {
        match incoming {
            Incoming::Channel(ch) => Self {
                door: None,
                single: Some(ch),
                config,
                acceptor: None,
            },
            Incoming::Acceptor(l) => {
                let door = Arc::new(Door {
                    st: Mutex::new(DoorState::default()),
                    threads: Default::default(),
                    cv: Condvar::new(),
                    stop: AtomicBool::new(false),
                    wake: eventfd(),
                    config: config.clone(),
                });
                let d = Arc::clone(&door);
                let acceptor = std::thread::Builder::new()
                    .name("ferry-doorman".into())
                    .spawn(move || accept_loop(l, d))
                    .ok();
                Self {
                    door: Some(door),
                    single: None,
                    config,
                    acceptor,
                }
            }
        }
    }

    /// True when data channels can connect (a listener, not a single connection).
    pub fn takes_channels(&self) -> bool {
        self.door.is_some()
    }

    /// True when another candidate may come after one is refused (a listener).
    pub fn waits_on(&self) -> bool {
        self.door.is_some()
    }

    /// Waits for the next main stream whose header and hello arrived whole. With one
    /// handed-in connection, reads them from it (a single chance).
    pub fn next_candidate(
        &mut self,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Candidate, MigrationError> {
        if let Some(ch) = self.single.take() {
            return identify_main(ch, "the handed-in connection".into(), &self.config)
                .map_err(|(_, e)| e);
        }
        let door = self.door.as_ref().expect("a listener");
        loop {
            {
                let st = door.st.lock().unwrap();
                let mut st = if st.candidates.is_empty() {
                    door.cv
                        .wait_timeout(st, Duration::from_millis(50))
                        .unwrap()
                        .0
                } else {
                    st
                };
                if let Some(c) = st.candidates.pop_front() {
                    return Ok(c);
                }
            }
            // Without the lock: the caller may look at the doorman meanwhile.
            if cancelled() {
                return Err(MigrationError::Cancelled);
            }
        }
    }

    /// The destination took a migration: later candidates are answered `busy`, and
    /// those already waiting are answered now.
    pub fn taken(&self) {
        let Some(door) = &self.door else { return };
        let waiting: Vec<Candidate> = {
            let mut st = door.st.lock().unwrap();
            st.busy = true;
            st.candidates.drain(..).collect()
        };
        for c in waiting {
            refuse_busy(door, c.ch, c.peer);
        }
    }

    /// Records a candidate the destination refused.
    pub fn refused(&self, peer: String, reason: String) {
        if let Some(door) = &self.door {
            door.st.lock().unwrap().stray(Stray {
                peer,
                reason: format!("refused: {reason}"),
            });
        }
    }

    /// Opens the door to `count` data channels of session `session`. Called before the
    /// accept goes out, since the source connects them as soon as it reads it.
    pub fn expect(&self, session: u64, count: u16, identity: Option<String>) {
        let door = self.door.as_ref().expect("a listener");
        let mut st = door.st.lock().unwrap();
        st.expect = Some((session, count));
        st.identity = identity;
        st.data = (0..count).map(|_| None).collect();
    }

    /// Waits up to `wait` for every expected data channel.
    pub fn channels(
        &mut self,
        wait: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<Channel>, MigrationError> {
        let door = self.door.as_ref().expect("a listener");
        let deadline = Instant::now() + wait;
        let mut st = door.st.lock().unwrap();
        let count = st.data.len() as u16;
        loop {
            if st.data.iter().all(Option::is_some) {
                st.closed = true;
                return Ok(st
                    .data
                    .iter_mut()
                    .map(|c| c.take().expect("bound"))
                    .collect());
            }
            if cancelled() {
                return Err(MigrationError::Cancelled);
            }
            if Instant::now() >= deadline {
                let missing: Vec<String> = st
                    .data
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.is_none())
                    .map(|(i, _)| i.to_string())
                    .collect();
                return Err(MigrationError::ChannelsMissing {
                    missing: missing.join(", "),
                    count,
                    secs: wait.as_secs_f64(),
                });
            }
            st = door
                .cv
                .wait_timeout(st, Duration::from_millis(20))
                .unwrap()
                .0;
        }
    }

    /// A handle that reads the strays while the doorman is busy waiting (for a caller's
    /// periodic report).
    pub fn stray_watch(&self) -> StrayWatch {
        StrayWatch(self.door.clone())
    }

    /// The connections turned away so far.
    pub fn strays_total(&self) -> u64 {
        self.door
            .as_ref()
            .map_or(0, |d| d.st.lock().unwrap().strays_total)
    }

    pub fn strays(&self) -> Vec<Stray> {
        self.door
            .as_ref()
            .map(|d| d.st.lock().unwrap().strays.clone())
            .unwrap_or_default()
    }

    /// Stops accepting (the listener closes; a unix socket's file is removed).
    /// Closes the door and waits for the acceptor thread to leave.
    pub fn close(&mut self) {
        self.shut();
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }

    /// Tells the acceptor thread to stop, without waiting for it: an acceptor with
    /// nothing to poll may be inside a short accept round, and the guest need not wait
    /// for that before it resumes.
    pub fn shut(&self) {
        if let Some(d) = &self.door {
            d.stop.store(true, Ordering::SeqCst);
            if let Some(w) = &d.wake {
                let one = 1u64.to_ne_bytes();
                // SAFETY: writes 8 bytes from a live buffer to our own eventfd.
                let _ = unsafe { libc::write(w.as_raw_fd(), one.as_ptr().cast(), 8) };
            }
        }
    }
}

impl Drop for Doorman {
    fn drop(&mut self) {
        self.close();
    }
}

fn accept_loop(l: Box<dyn Acceptor>, door: Arc<Door>) {
    let fd = l.poll_fd();
    let wake = door.wake.as_ref().map_or(-1, |w| w.as_raw_fd());
    while !door.stop.load(Ordering::SeqCst) {
        if door.threads.load(Ordering::SeqCst) >= MAX_DOOR_THREADS {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let within = match fd {
            // Wait for a connection or the wake-up together, then take the connection
            // without waiting.
            Some(fd) => {
                let mut pfd = [
                    libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: wake,
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                // Without an eventfd, look at the stop flag every 50 ms instead.
                let timeout = if wake < 0 { 50 } else { 1000 };
                // SAFETY: two valid pollfds for the call's duration (poll ignores -1).
                let r = unsafe { libc::poll(pfd.as_mut_ptr(), 2, timeout) };
                if r <= 0 || pfd[0].revents & libc::POLLIN == 0 {
                    continue;
                }
                Duration::ZERO
            }
            // An acceptor with nothing to poll: short rounds, so a close is seen soon.
            None => Duration::from_millis(50),
        };
        let (ch, peer) = match l.accept(within) {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a migration connection failed");
                if fd.is_none() {
                    std::thread::sleep(Duration::from_millis(50));
                }
                continue;
            }
        };
        // Make room: the oldest connection still identifying itself goes (its thread
        // wakes with an error and turns it away).
        let id = {
            let mut st = door.st.lock().unwrap();
            while st.pending.len() >= MAX_PENDING {
                if let Some((_, old)) = st.pending.pop_front() {
                    old.shutdown();
                }
            }
            let id = st.next_id;
            st.next_id += 1;
            if let Ok(handle) = ch.try_clone() {
                st.pending.push_back((id, handle));
            }
            id
        };
        let d = Arc::clone(&door);
        door.threads.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("ferry-door".into())
            .stack_size(DOOR_STACK)
            .spawn(move || {
                sort(&d, ch, peer);
                d.st.lock().unwrap().pending.retain(|(i, _)| *i != id);
                d.threads.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            door.threads.fetch_sub(1, Ordering::SeqCst);
            door.st.lock().unwrap().pending.retain(|(i, _)| *i != id);
        }
    }
}

fn eventfd() -> Option<OwnedFd> {
    // SAFETY: plain syscall; a valid descriptor is owned by the OwnedFd from here on.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn turn_away(door: &Door, ch: Channel, peer: String, reason: String) {
    tracing::warn!(%peer, %reason, "turned away a connection to the migration address");
    ch.shutdown();
    door.st.lock().unwrap().stray(Stray { peer, reason });
    door.cv.notify_all();
}

/// Reads exactly `buf.len()` bytes before `deadline`: a deadline for the whole, not a
/// timeout per read, so a peer that trickles is cut like a silent one.
fn read_by(ch: &mut Channel, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{at} of {} bytes arrived in time", buf.len()),
            ));
        }
        ch.set_read_timeout(Some(left))?;
        match ch.read(&mut buf[at..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads a main stream's header and hello frame (whose magic is already read), within
/// the handshake deadline. On failure, the reason and the error: the connection is a
/// stray.
fn identify_main(
    mut ch: Channel,
    peer: String,
    config: &DoorConfig,
) -> Result<Candidate, (String, MigrationError)> {
    read_main(
        &mut ch,
        config,
        Instant::now() + config.handshake_timeout,
        None,
    )
    .map(|hello| Candidate { ch, peer, hello })
}

/// Reads the stream header (after `magic`, if already read), refusing a protocol version
/// this release does not speak, and returns the hello frame's payload.
fn read_main(
    ch: &mut Channel,
    config: &DoorConfig,
    deadline: Instant,
    magic: Option<[u8; 8]>,
) -> Result<Vec<u8>, (String, MigrationError)> {
    let waited = |e: io::Error, what: &'static str| {
        (
            format!(
                "short {what} (a connection has {} ms for it): {e}",
                config.handshake_timeout.as_millis()
            ),
            MigrationError::io("source", what, e),
        )
    };
    let mut hb = [0u8; StreamHeader::LEN];
    let from = match magic {
        Some(m) => {
            hb[..8].copy_from_slice(&m);
            8
        }
        None => 0,
    };
    read_by(ch, &mut hb[from..], deadline).map_err(|e| waited(e, "stream header"))?;
    let header = StreamHeader::decode(&hb)
        .map_err(|e| (format!("bad stream header: {e}"), MigrationError::from(e)))?;
    if !SUPPORTED_PROTOCOL_VERSIONS.contains(&header.version) {
        // Another protocol version may frame its hello differently: answer now.
        let reason = format!(
            "the source speaks migration protocol version {}, this release ({}) speaks {:?}; migrate between releases that share a protocol version",
            header.version, config.release, SUPPORTED_PROTOCOL_VERSIONS
        );
        let _ = write_frame(
            ch,
            FrameTag::Refuse,
            &Refuse {
                cause: RefuseCause::ProtocolVersion,
                reason: reason.clone(),
            }
            .encode(),
            "source",
            "refuse",
        );
        return Err((
            format!("refused: {reason}"),
            MigrationError::Incompatible {
                cause: RefuseCause::ProtocolVersion,
                reason,
            },
        ));
    }
    let mut fb = [0u8; FrameHeader::LEN];
    read_by(ch, &mut fb, deadline).map_err(|e| waited(e, "hello"))?;
    let fh = FrameHeader::decode(&fb)
        .map_err(|e| (format!("bad frame header: {e}"), MigrationError::from(e)))?;
    if fh.tag != FrameTag::Hello {
        let e = crate::wire::WireError::UnexpectedFrame {
            tag: fh.tag as u8,
            expected: "hello",
        };
        return Err((format!("{e}"), e.into()));
    }
    // Grown as bytes arrive, so a connection costs what it has sent.
    let len = fh.len as usize;
    let mut hello = Vec::with_capacity(len.min(READ_STEP));
    while hello.len() < len {
        let at = hello.len();
        let step = (len - at).min(READ_STEP);
        hello.resize(at + step, 0);
        read_by(ch, &mut hello[at..], deadline).map_err(|e| waited(e, "hello"))?;
    }
    let _ = ch.set_read_timeout(None);
    Ok(hello)
}

fn refuse_busy(door: &Door, ch: Channel, peer: String) {
    let _ = write_frame(
        &ch,
        FrameTag::Refuse,
        &Refuse {
            cause: RefuseCause::Busy,
            reason: "this destination is already receiving a migration".into(),
        }
        .encode(),
        "source",
        "refuse",
    );
    turn_away(door, ch, peer, "a second migration stream".into());
}

/// Reads a connection's header (and a main stream's hello) and routes it.
fn sort(door: &Door, mut ch: Channel, peer: String) {
    let deadline = Instant::now() + door.config.handshake_timeout;
    let mut magic = [0u8; 8];
    if let Err(e) = read_by(&mut ch, &mut magic, deadline) {
        return turn_away(door, ch, peer, format!("no header: {e}"));
    }
    if magic == MAGIC {
        let hello = match read_main(&mut ch, &door.config, deadline, Some(magic)) {
            Ok(m) => m,
            Err((reason, _)) => return turn_away(door, ch, peer, reason),
        };
        let mut st = door.st.lock().unwrap();
        if st.busy || st.closed {
            drop(st);
            return refuse_busy(door, ch, peer);
        }
        st.candidates.push_back(Candidate { ch, peer, hello });
        drop(st);
        door.cv.notify_all();
        return;
    }
    if magic[0] == 0x16 && magic[1] == 0x03 {
        return refuse_tls(door, ch, peer, &magic, deadline);
    }
    if magic != CHANNEL_MAGIC {
        return turn_away(
            door,
            ch,
            peer,
            format!("not a ferry migration connection (first bytes {magic:02x?})"),
        );
    }
    let mut hb = [0u8; ChannelHeader::LEN];
    hb[..8].copy_from_slice(&magic);
    if let Err(e) = read_by(&mut ch, &mut hb[8..], deadline) {
        return turn_away(door, ch, peer, format!("short channel header: {e}"));
    }
    let h = match ChannelHeader::decode(&hb) {
        Ok(h) => h,
        Err(e) => return turn_away(door, ch, peer, format!("bad channel header: {e}")),
    };
    if h.version != CHANNEL_VERSION {
        return turn_away(
            door,
            ch,
            peer,
            format!(
                "data channel version {} (this release speaks {CHANNEL_VERSION})",
                h.version
            ),
        );
    }
    let mut st = door.st.lock().unwrap();
    let reason = match st.expect {
        None => Some(format!(
            "data channel {} of session {:#x} before any migration announced channels",
            h.index, h.session_id
        )),
        Some((session, _)) if session != h.session_id => Some(format!(
            "data channel {} of session {:#x}, not this migration's",
            h.index, h.session_id
        )),
        Some((_, count)) if count != h.count => Some(format!(
            "data channel {} says {} channels, the migration has {count}",
            h.index, h.count
        )),
        _ if st.closed => Some(format!(
            "data channel {} arrived after all channels were bound",
            h.index
        )),
        Some(_) if st.data[h.index as usize].is_some() => {
            Some(format!("data channel {} is already bound", h.index))
        }
        Some(_) if ch.peer_identity() != st.identity => Some(format!(
            "data channel {} presents the identity {}, the main channel {}",
            h.index,
            identity_name(ch.peer_identity()),
            identity_name(st.identity.clone())
        )),
        Some(_) => None,
    };
    match reason {
        Some(r) => {
            drop(st);
            turn_away(door, ch, peer, r);
        }
        None => {
            let _ = ch.set_read_timeout(None);
            st.data[h.index as usize] = Some(ch);
            drop(st);
            door.cv.notify_all();
        }
    }
}

fn identity_name(id: Option<String>) -> String {
    match id {
        Some(i) => format!("{i:?}"),
        None => "of no authenticated peer".into(),
    }
}

/// A TLS ClientHello at a destination that takes plaintext: reads the rest of its record
/// (so that closing does not reset the connection under the answer) and answers with a
/// plaintext refusal, which a ferry TLS source reads in place of the server's hello.
fn refuse_tls(door: &Door, mut ch: Channel, peer: String, magic: &[u8; 8], deadline: Instant) {
    let record = usize::from(u16::from_be_bytes([magic[3], magic[4]]));
    let mut rest = vec![0u8; (record + 5).saturating_sub(magic.len()).min(READ_STEP)];
    let _ = read_by(&mut ch, &mut rest, deadline);
    let reason = "this destination takes plaintext migrations (it was started without \
                  ferry run --tls-creds); this source connected with TLS";
    let _ = write_frame(
        &ch,
        FrameTag::Refuse,
        &Refuse {
            cause: RefuseCause::Security,
            reason: reason.into(),
        }
        .encode(),
        "source",
        "refuse",
    );
    turn_away(door, ch, peer, format!("refused: {reason}"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::transport::MigrationStream;
    use std::net::Shutdown;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;

    /// A unix stream that says its peer proved `id`, as a TLS stream does.
    struct Proven(UnixStream, Option<String>);

    impl MigrationStream for Proven {
        fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
            MigrationStream::read(&self.0, buf)
        }
        fn write(&self, buf: &[u8]) -> io::Result<usize> {
            MigrationStream::write(&self.0, buf)
        }
        fn try_clone(&self) -> io::Result<Box<dyn MigrationStream>> {
            Ok(Box::new(Proven(self.0.try_clone()?, self.1.clone())))
        }
        fn shutdown(&self, how: Shutdown) {
            let _ = self.0.shutdown(how);
        }
        fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
            self.0.set_read_timeout(t)
        }
        fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
            self.0.set_write_timeout(t)
        }
        fn peer_identity(&self) -> Option<String> {
            self.1.clone()
        }
    }

    /// Hands the door the connections a test makes.
    struct Feed(Mutex<mpsc::Receiver<Channel>>);

    impl Acceptor for Feed {
        fn accept(&self, within: Duration) -> io::Result<Option<(Channel, String)>> {
            Ok(self
                .0
                .lock()
                .unwrap()
                .recv_timeout(within)
                .ok()
                .map(|c| (c, "test".to_string())))
        }
    }

    /// A data channel of the right session presenting another identity than the main
    /// channel is a stray; one presenting the same identity is bound.
    #[test]
    fn a_data_channel_must_prove_the_main_channels_identity() {
        let (tx, rx) = mpsc::channel();
        let mut door = Doorman::new(
            Incoming::acceptor(Feed(Mutex::new(rx))),
            DoorConfig {
                handshake_timeout: Duration::from_secs(2),
                release: "test".into(),
            },
        );
        door.expect(7, 1, Some("alice".into()));
        let header = ChannelHeader {
            version: CHANNEL_VERSION,
            session_id: 7,
            index: 0,
            count: 1,
        }
        .encode();
        let mut ends = Vec::new();
        for id in ["bob", "alice"] {
            let (a, b) = UnixStream::pair().unwrap();
            MigrationStream::write(&a, &header).unwrap();
            tx.send(Channel::new(Proven(b, Some(id.into())))).unwrap();
            ends.push(a);
            // One at a time, so that bob's comes first.
            std::thread::sleep(Duration::from_millis(200));
        }
        let bound = door.channels(Duration::from_secs(5), &|| false).unwrap();
        assert_eq!(bound[0].peer_identity().as_deref(), Some("alice"));
        let strays = door.strays();
        assert!(
            strays.iter().any(|s| s.reason
                == "data channel 0 presents the identity \"bob\", the main channel \"alice\""),
            "{strays:?}"
        );
        door.close();
    }
}
