//! Liveness: how either side tells a dead peer or a dead link from a slow or idle one.
//!
//! A peer is alive while something comes from it: one [`Liveness`] per migration and
//! side records the last sign of life on any of the migration's channels (bytes read;
//! and, from a peer that sends no keepalives, bytes the kernel took for it, the only
//! sign such a peer gives while it only reads), and a channel blocked in a read
//! or a write keeps waiting as long as the peer as a whole has been heard from within
//! the limit. That is what makes a slow link safe: a data channel waiting its turn
//! behind the others, or behind a sync, is not dead while the others move. Only when
//! nothing at all came for the limit does the blocked call fail, with a [`Stalled`]
//! error that names the channel, how long it waited, and how long the peer was silent.
//!
//! Channels poll instead of blocking for good: a watched channel's socket timeouts are
//! set to [`POLL`], and each expiry is a chance to check the peer's silence (never a
//! failure of its own, so a partial read or write is never lost).
//!
//! A healthy migration also has quiet stretches: an idle guest whose memory has
//! converged, a destination loading and verifying after the end of stream. So each side
//! sends keepalive frames on the main channel (source) and the return path
//! (destination) while it has nothing else to say, and a side keeps the short limit
//! (`migration.liveness-timeout`) only for a peer that has shown it sends them. They
//! are negotiated: the source states its limit in its hello (the annotation
//! `x-hello.liveness`), a destination that knows keepalives answers with one on the
//! return path, and only then does the source send its own. From then on only what
//! comes from the peer counts: a write the kernel takes proves nothing about a peer
//! whose host (or a middlebox) still acknowledges while the peer itself has stopped,
//! and buffers that take minutes to fill at a capped rate must not hide that the
//! keepalives stopped. A peer without keepalives
//! (releases 0.1.0 and 0.2.0) falls silent for as long as its own work takes, and is
//! given [`LEGACY_LIMIT`], what those releases allowed.
//!
//! Below this, on TCP, the kernel watches the link itself: keepalive probes on idle
//! connections and `TCP_USER_TIMEOUT` on unacknowledged data
//! ([`super::transport::MigrationStream::set_liveness`]), at twice the limit so that a
//! stall the engine still tolerates is not cut by the kernel first.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::transport::Channel;
use crate::wire::{FrameHeader, FrameTag, Keepalive};

/// How often a watched channel's blocked call wakes to check its peer's silence.
pub(crate) const POLL: Duration = Duration::from_millis(200);

/// The silence allowed a peer that sends no keepalives (0.1's idle timeout).
pub(crate) const LEGACY_LIMIT: Duration = Duration::from_secs(120);

/// The last sign of life from the peer, over all of one migration's channels.
#[derive(Debug)]
pub(crate) struct Liveness {
    epoch: Instant,
    /// Milliseconds from `epoch` to the last sign of life.
    last: AtomicU64,
    /// The silence allowed, in milliseconds.
    limit: AtomicU64,
    /// Whether bytes the kernel takes for the peer count as its life: only until the
    /// peer has shown it sends keepalives.
    writes_count: AtomicBool,
}

impl Liveness {
    pub(crate) fn new(limit: Duration) -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            limit: AtomicU64::new(limit.as_millis() as u64),
            writes_count: AtomicBool::new(true),
        })
    }

    /// A peer that sends keepalives: it gets `limit`, and only what comes from it
    /// counts as its life.
    pub(crate) fn with_keepalives(limit: Duration) -> Arc<Self> {
        let l = Self::new(limit);
        l.writes_count.store(false, Ordering::Relaxed);
        l
    }

    /// Bytes the kernel took for the peer: a sign of life only from a peer without
    /// keepalives.
    pub(crate) fn wrote(&self) {
        if self.writes_count.load(Ordering::Relaxed) {
            self.heard();
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Something came from the peer.
    pub(crate) fn heard(&self) {
        self.last.fetch_max(self.now_ms(), Ordering::Relaxed);
    }

    /// How long the peer has been silent.
    pub(crate) fn silence(&self) -> Duration {
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last.load(Ordering::Relaxed)),
        )
    }

    pub(crate) fn limit(&self) -> Duration {
        Duration::from_millis(self.limit.load(Ordering::Relaxed))
    }

    /// The peer proved it sends keepalives: from now on it gets `limit`, and only what
    /// comes from it counts.
    pub(crate) fn set_limit(&self, limit: Duration) {
        self.writes_count.store(false, Ordering::Relaxed);
        self.heard();
        self.limit
            .store(limit.as_millis() as u64, Ordering::Relaxed);
    }
}

/// What a channel consults when a call of its blocks past [`POLL`].
#[derive(Debug, Clone)]
pub(crate) struct Watch {
    pub(crate) live: Arc<Liveness>,
    /// The channel, for messages ("main channel", "data channel 2").
    pub(crate) channel: String,
    /// What the transport was asked to allow the link ([`Channel::watch`]).
    pub(crate) link_limit: Duration,
}

impl Watch {
    /// Called when a read or write on the channel has blocked since `since`: `Ok` to
    /// keep waiting, or the error that ends the wait.
    pub(crate) fn stalled(&self, since: Instant) -> Result<(), Stalled> {
        let silence = self.live.silence();
        let limit = self.live.limit();
        if silence < limit {
            return Ok(());
        }
        Err(Stalled {
            channel: self.channel.clone(),
            waited: since.elapsed(),
            silence,
            limit,
            by_kernel: false,
        })
    }

    /// The kernel dropped the connection (`ETIMEDOUT`: the peer's host took nothing,
    /// not even keepalive probes or zero-window probes, for the link limit).
    pub(crate) fn dropped(&self, since: Instant) -> Stalled {
        Stalled {
            channel: self.channel.clone(),
            waited: since.elapsed(),
            silence: self.live.silence(),
            limit: self.link_limit,
            by_kernel: true,
        }
    }
}

/// A channel gave up: its peer was silent on every channel for the whole limit.
/// Carried inside an `io::Error` of kind `TimedOut`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stalled {
    pub channel: String,
    /// How long the call that gave up had been blocked.
    pub waited: Duration,
    /// How long nothing came from the peer on any channel.
    pub silence: Duration,
    pub limit: Duration,
    /// The kernel gave up on the connection (TCP's user timeout) before the engine did.
    pub by_kernel: bool,
}

impl fmt::Display for Stalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.by_kernel {
            return write!(
                f,
                "the kernel dropped {}: the peer's host acknowledged nothing it sent for {:.1} s (TCP_USER_TIMEOUT, twice migration.liveness-timeout); nothing came from the peer on any channel for {:.1} s",
                self.channel,
                self.limit.as_secs_f64(),
                self.silence.as_secs_f64()
            );
        }
        write!(
            f,
            "{} waited {:.1} s; nothing came on any channel for {:.1} s (the limit is {:.1} s)",
            self.channel,
            self.waited.as_secs_f64(),
            self.silence.as_secs_f64(),
            self.limit.as_secs_f64()
        )
    }
}

impl std::error::Error for Stalled {}

/// How often to send a keepalive to a peer that allows `limit` of silence: often
/// enough that a few may be lost or late.
pub(crate) fn keepalive_interval(limit: Duration) -> Duration {
    (limit / 4).clamp(Duration::from_millis(50), Duration::from_secs(2))
}

/// A thread that sends a keepalive frame on a channel whenever a quarter of the limit
/// has passed, between the frames of other threads (it takes the channel's write lock,
/// and skips a round when another thread holds it: that thread's frame says as much).
pub(crate) struct KeepaliveSender {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl KeepaliveSender {
    /// Starts sending `tag` frames stating `own` on `ch`. `peer` holds the peer's limit
    /// in milliseconds, 0 until the peer has shown it takes keepalives: nothing is sent
    /// before that, and then as often as the smaller limit wants.
    pub(crate) fn start(
        ch: Channel,
        tag: FrameTag,
        own: Duration,
        peer: Arc<AtomicU64>,
    ) -> std::io::Result<Self> {
        let (stop, rx) = mpsc::channel::<()>();
        let own_ms = own.as_millis().min(u32::MAX as u128) as u32;
        let payload = Keepalive { limit_ms: own_ms }.encode();
        let header = FrameHeader {
            tag,
            len: payload.len() as u32,
        }
        .encode();
        let thread = std::thread::Builder::new()
            .name("ferry-keepalive".into())
            .stack_size(64 << 10)
            .spawn(move || loop {
                let peer_ms = peer.load(Ordering::Relaxed);
                let limit = match peer_ms {
                    0 => own,
                    p => own.min(Duration::from_millis(p)),
                };
                match rx.recv_timeout(keepalive_interval(limit)) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                if peer_ms == 0 {
                    continue;
                }
                if let Some(w) = ch.try_lock_for_keepalive() {
                    if w.write_bufs(&[&header, &payload]).is_err() {
                        // The thread that owns the stream finds out on its own.
                        return;
                    }
                }
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it: no keepalive goes out after this returns.
    pub(crate) fn stop(mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for KeepaliveSender {
    /// Tells the thread to stop without waiting (it may be blocked on a dying stream).
    fn drop(&mut self) {
        self.stop.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_grows_until_something_is_heard() {
        let l = Liveness::new(Duration::from_millis(100));
        let w = Watch {
            live: Arc::clone(&l),
            channel: "main channel".into(),
            link_limit: Duration::from_millis(200),
        };
        let since = Instant::now();
        l.heard();
        assert!(w.stalled(since).is_ok());
        std::thread::sleep(Duration::from_millis(130));
        let e = w.stalled(since).unwrap_err();
        assert!(e.silence >= Duration::from_millis(100), "{e:?}");
        assert!(e.waited >= Duration::from_millis(130), "{e:?}");
        assert!(
            e.to_string().starts_with("main channel waited 0.1 s"),
            "{e}"
        );
        l.heard();
        assert!(w.stalled(since).is_ok());
        let k = w.dropped(since);
        assert!(k.to_string().contains("TCP_USER_TIMEOUT"), "{k}");
        // Writes are life only until the peer shows keepalives.
        let quiet = Liveness::with_keepalives(Duration::from_millis(100));
        std::thread::sleep(Duration::from_millis(120));
        quiet.wrote();
        assert!(quiet.silence() >= Duration::from_millis(100));
        quiet.heard();
        assert!(quiet.silence() < Duration::from_millis(100));
        l.set_limit(Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(130));
        assert!(w.stalled(since).is_ok());
    }

    #[test]
    fn keepalives_come_several_times_per_limit() {
        assert_eq!(
            keepalive_interval(Duration::from_secs(5)),
            Duration::from_millis(1250)
        );
        assert_eq!(
            keepalive_interval(Duration::from_millis(100)),
            Duration::from_millis(50)
        );
        assert_eq!(
            keepalive_interval(Duration::from_secs(120)),
            Duration::from_secs(2)
        );
    }
}
