//! Where a destination's connections come from: one handed-in channel, or an
//! [`Acceptor`] (a listener, or whatever the embedder accepts connections with) whose
//! connections are sorted by the header each one opens with.
//!
//! Every connection declares what it is in its first bytes: the main stream's
//! [`StreamHeader`] or a data channel's [`ChannelHeader`], each with its own magic. The
//! doorman reads that header (with a time limit, on a thread of its own so one silent
//! connection holds up nothing) and then:
//!
//! * the first main stream is the migration; a later one is answered with a `busy`
//!   refusal, so a second source learns why;
//! * a data channel is bound only if its session id is the hello's, its channel count
//!   is the hello's, and its index is in range and not yet taken;
//! * anything else (another magic, a wrong version, a channel for another migration or
//!   for none yet, a duplicate, silence) is logged and closed. It never disturbs the
//!   migration under way.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::error::MigrationError;
use super::stream::write_frame;
use super::transport::{Acceptor, Channel};
use crate::wire::{
    ChannelHeader, FrameTag, Refuse, RefuseCause, StreamHeader, CHANNEL_MAGIC, CHANNEL_VERSION,
    MAGIC,
};

/// How long a new connection may take to say what it is.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections whose header is still awaited; more are closed at once.
const MAX_PENDING: usize = 64;

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

#[derive(Default)]
struct DoorState {
    /// The main stream, waiting for the migration to take it.
    main: Option<(Channel, [u8; StreamHeader::LEN])>,
    main_taken: bool,
    /// The session and channel count the hello announced.
    expect: Option<(u64, u16)>,
    data: Vec<Option<Channel>>,
    strays: Vec<Stray>,
    closed: bool,
}

struct Door {
    st: Mutex<DoorState>,
    cv: Condvar,
    stop: AtomicBool,
    /// An eventfd the acceptor polls beside the acceptor's descriptor, so closing wakes
    /// it at once.
    wake: Option<OwnedFd>,
    pending: AtomicUsize,
}

/// The connections of one incoming migration.
pub(crate) struct Doorman {
    door: Option<Arc<Door>>,
    single: Option<Channel>,
    acceptor: Option<JoinHandle<()>>,
}

impl Doorman {
    pub fn new(incoming: Incoming) -> Self {
        match incoming {
            Incoming::Channel(ch) => Self {
                door: None,
                single: Some(ch),
                acceptor: None,
            },
            Incoming::Acceptor(l) => {
                let door = Arc::new(Door {
                    st: Mutex::new(DoorState::default()),
                    cv: Condvar::new(),
                    stop: AtomicBool::new(false),
                    wake: eventfd(),
                    pending: AtomicUsize::new(0),
                });
                let d = Arc::clone(&door);
                let acceptor = std::thread::Builder::new()
                    .name("ferry-doorman".into())
                    .spawn(move || accept_loop(l, d))
                    .ok();
                Self {
                    door: Some(door),
                    single: None,
                    acceptor,
                }
            }
        }
    }

    /// True when data channels can connect (a listener, not a single connection).
    pub fn takes_channels(&self) -> bool {
        self.door.is_some()
    }

    /// Waits for the main stream; returns it with its header bytes.
    pub fn main(
        &mut self,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(Channel, [u8; StreamHeader::LEN]), MigrationError> {
        if let Some(mut ch) = self.single.take() {
            let mut hb = [0u8; StreamHeader::LEN];
            ch.read_exact(&mut hb)
                .map_err(|e| MigrationError::io("source", "stream header", e))?;
            return Ok((ch, hb));
        }
        let door = self.door.as_ref().expect("a listener");
        let mut st = door.st.lock().unwrap();
        loop {
            if let Some(m) = st.main.take() {
                st.main_taken = true;
                return Ok(m);
            }
            if cancelled() {
                return Err(MigrationError::Cancelled);
            }
            st = door
                .cv
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap()
                .0;
        }
    }

    /// Opens the door to `count` data channels of session `session`. Called before the
    /// accept goes out, since the source connects them as soon as it reads it.
    pub fn expect(&self, session: u64, count: u16) {
        let door = self.door.as_ref().expect("a listener");
        let mut st = door.st.lock().unwrap();
        st.expect = Some((session, count));
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

    /// The connections turned away so far.
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
        if door.pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING {
            door.pending.fetch_sub(1, Ordering::SeqCst);
            turn_away(
                &door,
                ch,
                peer,
                "too many connections waiting to identify".into(),
            );
            continue;
        }
        let d = Arc::clone(&door);
        let spawned = std::thread::Builder::new()
            .name("ferry-door".into())
            .spawn(move || {
                sort(&d, ch, peer);
                d.pending.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            door.pending.fetch_sub(1, Ordering::SeqCst);
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
    door.st.lock().unwrap().strays.push(Stray { peer, reason });
    door.cv.notify_all();
}

/// Reads a connection's header and routes it.
fn sort(door: &Door, mut ch: Channel, peer: String) {
    let _ = ch.set_read_timeout(Some(HEADER_TIMEOUT));
    let mut magic = [0u8; 8];
    if let Err(e) = ch.read_exact(&mut magic) {
        return turn_away(door, ch, peer, format!("no header: {e}"));
    }
    if magic == MAGIC {
        let mut hb = [0u8; StreamHeader::LEN];
        hb[..8].copy_from_slice(&magic);
        if let Err(e) = ch.read_exact(&mut hb[8..]) {
            return turn_away(door, ch, peer, format!("short stream header: {e}"));
        }
        let mut st = door.st.lock().unwrap();
        if st.main.is_some() || st.main_taken {
            drop(st);
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
            return turn_away(door, ch, peer, "a second migration stream".into());
        }
        let _ = ch.set_read_timeout(None);
        st.main = Some((ch, hb));
        drop(st);
        door.cv.notify_all();
        return;
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
    if let Err(e) = ch.read_exact(&mut hb[8..]) {
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
