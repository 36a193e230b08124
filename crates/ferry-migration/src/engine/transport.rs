//! Transports: the byte streams a migration runs over, handed to the engine by its
//! embedder ([`MigrationStream`], [`Connector`], [`Acceptor`]).
//!
//! The engine never dials, listens or parses an address: its embedder does, and hands
//! it connected streams (the reference VMM's `ferry_vmm::transport` does this for
//! `tcp:HOST:PORT` and `unix:PATH` addresses). What lives here besides the traits is
//! only what the orphan rule leaves to this crate: the traits implemented for the
//! standard library's sockets ([`TcpStream`], [`UnixStream`] as streams, a bound
//! [`TcpListener`] or [`UnixListener`] as an acceptor), so that any embedder can hand
//! those over as they are.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::liveness::{Liveness, Watch, POLL};

/// A connected byte stream to the other side: what the engine migrates over.
///
/// The engine never dials or listens on its own: the embedder hands it streams through
/// a [`Connector`] (source) or an [`Acceptor`] (destination), so a migration can run over
/// TCP, a unix socket, TLS, vsock or a descriptor its management layer passed in. This
/// module implements the trait for plain sockets ([`TcpStream`], [`UnixStream`]).
///
/// Reads and writes take `&self`, as they do on a socket: one thread reads the return
/// path while another writes the stream, through handles from [`try_clone`].
///
/// [`raw_fd`] is the fast path: a stream whose bytes go to the peer unchanged (a plain
/// socket) names its descriptor, and the engine then moves guest pages with `writev` and
/// `readv` straight between guest memory and the kernel. A stream that transforms its
/// bytes (TLS) returns `None`, and the engine copies pages through a buffer of its own
/// and writes them with [`write`]: slower, and the same bytes on the wire.
///
/// [`try_clone`]: MigrationStream::try_clone
/// [`raw_fd`]: MigrationStream::raw_fd
/// [`write`]: MigrationStream::write
pub trait MigrationStream: Send + Sync + 'static {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize>;

    fn write(&self, buf: &[u8]) -> io::Result<usize>;

    /// Writes from `bufs` in order, as [`write`] would write their concatenation:
    /// returns how many bytes, from the start, the stream took. A stream that transforms
    /// its bytes (TLS) takes a frame's head and its pages in one call and seals them
    /// into full records together; the default writes the first non-empty buffer.
    ///
    /// [`write`]: MigrationStream::write
    fn write_vectored(&self, bufs: &[&[u8]]) -> io::Result<usize> {
        match bufs.iter().find(|b| !b.is_empty()) {
            Some(b) => self.write(b),
            None => Ok(0),
        }
    }

    /// Reads up to `max` bytes and hands them to `sink`, in order, in one or more
    /// slices; returns how many it handed over (0 at end of file). A stream that holds
    /// the bytes in buffers of its own (TLS plaintext) hands out slices of those, so
    /// that the engine copies them once, straight to where they go (guest memory),
    /// instead of first into a buffer of its own. The default reads into a buffer on
    /// the stack and hands that over.
    fn read_into(&self, max: usize, sink: &mut dyn FnMut(&[u8])) -> io::Result<usize> {
        let mut b = [0u8; 4096];
        let n = self.read(&mut b[..max.min(4096)])?;
        sink(&b[..n]);
        Ok(n)
    }

    /// Another handle on the same stream, usable from another thread at the same time.
    fn try_clone(&self) -> io::Result<Box<dyn MigrationStream>>;

    /// Closes the given directions, waking any thread blocked on the stream.
    fn shutdown(&self, how: Shutdown);

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;

    /// The socket's descriptor, if bytes written to it reach the peer unchanged.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }

    /// The engine takes a link silent for `limit` as dead: a transport that can watch
    /// the link below the engine gives up on it by then as well. TCP sockets turn on
    /// keepalive probes for idle connections and `TCP_USER_TIMEOUT` for data the peer's
    /// host stopped acknowledging; the default does nothing.
    fn set_liveness(&self, limit: Duration) -> io::Result<()> {
        let _ = limit;
        Ok(())
    }

    /// Who the peer proved to be, for a transport that authenticates it (a TLS client
    /// certificate's identity): the destination binds a data channel only if it presents
    /// the same identity as the main channel. `None` for an unauthenticated stream.
    fn peer_identity(&self) -> Option<String> {
        None
    }
}

impl MigrationStream for TcpStream {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&mut &*self).read(buf)
    }
    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        (&mut &*self).write(buf)
    }
    fn try_clone(&self) -> io::Result<Box<dyn MigrationStream>> {
        Ok(Box::new(TcpStream::try_clone(self)?))
    }
    fn shutdown(&self, how: Shutdown) {
        let _ = TcpStream::shutdown(self, how);
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, t)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
    fn set_liveness(&self, limit: Duration) -> io::Result<()> {
        tcp_liveness(self.as_raw_fd(), limit)
    }
}

/// Keepalive probes from a third of `limit` of idleness, one a second, and
/// `TCP_USER_TIMEOUT` of `limit`: the kernel drops the connection (`ETIMEDOUT`) once
/// the peer's host has acknowledged nothing for that long, probes included.
fn tcp_liveness(fd: RawFd, limit: Duration) -> io::Result<()> {
    let set = |level: libc::c_int, name: libc::c_int, v: libc::c_int| -> io::Result<()> {
        // SAFETY: an int option of the right size on a socket we hold.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    let ms = limit.as_millis().clamp(1000, i32::MAX as u128) as libc::c_int;
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, (ms / 3000).max(1))?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1)?;
    // The kernel takes at most 127 probes; TCP_USER_TIMEOUT decides when a connection
    // whose probes go unanswered is dropped in any case.
    set(
        libc::IPPROTO_TCP,
        libc::TCP_KEEPCNT,
        (ms / 1000).clamp(3, 127),
    )?;
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)
}

impl MigrationStream for UnixStream {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&mut &*self).read(buf)
    }
    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        (&mut &*self).write(buf)
    }
    fn try_clone(&self) -> io::Result<Box<dyn MigrationStream>> {
        Ok(Box::new(UnixStream::try_clone(self)?))
    }
    fn shutdown(&self, how: Shutdown) {
        let _ = UnixStream::shutdown(self, how);
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, t)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

/// A connected migration channel: a [`MigrationStream`] as the engine holds it.
///
/// Once the engine watches it ([`Channel::watch`]), a blocked read or write no longer
/// fails on its socket timeout: it waits as long as the peer shows life on any channel
/// of the migration, and fails with a [`Stalled`](super::liveness::Stalled) error once
/// the peer was silent for the whole limit (see [`super::liveness`]).
///
/// Frames are written under the channel's write lock, which its clones share: a thread
/// that sends keepalives on a clone ([`Channel::try_lock`]) only ever writes between
/// two frames of another thread, never into one.
pub struct Channel {
    s: Box<dyn MigrationStream>,
    watch: Option<Watch>,
    wlock: Arc<Mutex<()>>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("fd", &self.s.raw_fd())
            .finish()
    }
}

/// Which way a call moves bytes, for [`Channel::retry`].
#[derive(Clone, Copy)]
enum Dir {
    Read,
    /// Whether an accepted write counts as the peer's life.
    Write(bool),
}

impl Channel {
    pub fn new(stream: impl MigrationStream) -> Self {
        Self::from_boxed(Box::new(stream))
    }

    pub fn from_boxed(stream: Box<dyn MigrationStream>) -> Self {
        Self {
            s: stream,
            watch: None,
            wlock: Arc::new(Mutex::new(())),
        }
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            s: self.s.try_clone()?,
            watch: self.watch.clone(),
            wlock: Arc::clone(&self.wlock),
        })
    }

    /// Closes both directions, waking any thread blocked on the channel.
    pub fn shutdown(&self) {
        self.s.shutdown(Shutdown::Both);
    }

    /// Closes the reading side only: a thread blocked reading wakes with end of file,
    /// while writes (a reason for the peer) still go out.
    pub fn shutdown_read(&self) {
        self.s.shutdown(Shutdown::Read);
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.s.set_read_timeout(t)
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.s.set_write_timeout(t)
    }

    /// Who the peer proved to be ([`MigrationStream::peer_identity`]).
    pub fn peer_identity(&self) -> Option<String> {
        self.s.peer_identity()
    }

    /// The socket's descriptor when pages may be moved by `writev`/`readv` on it.
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.s.raw_fd()
    }

    /// From now on a blocked call on this handle (and on clones made after) waits for
    /// as long as `live` says the peer is alive; the transport is asked to watch the
    /// link too, giving up after `link_limit`.
    pub(crate) fn watch(
        &mut self,
        live: &Arc<Liveness>,
        channel: impl Into<String>,
        link_limit: Duration,
    ) -> io::Result<()> {
        self.s.set_read_timeout(Some(POLL))?;
        self.s.set_write_timeout(Some(POLL))?;
        // The link watch below the engine is a second line; without it the engine's own
        // watch still holds.
        if let Err(e) = self.s.set_liveness(link_limit) {
            tracing::warn!(error = %e, "the transport could not watch the link itself");
        }
        self.watch = Some(Watch {
            live: Arc::clone(live),
            channel: channel.into(),
            link_limit,
        });
        Ok(())
    }

    /// Stops watching: calls block for as long as the socket timeouts say.
    pub(crate) fn unwatch(&mut self) {
        self.watch = None;
        let _ = self.s.set_read_timeout(None);
        let _ = self.s.set_write_timeout(None);
    }

    /// The outcome of one read, for the liveness watch: bytes read are a sign of life,
    /// an expired socket timeout a question of whether to go on waiting.
    fn progress(&self, moved: Option<usize>, since: Instant) -> io::Result<()> {
        match (&self.watch, moved) {
            (Some(w), Some(n)) if n > 0 => {
                w.live.heard();
                Ok(())
            }
            _ => self.progress_as(moved, since, false),
        }
    }

    /// The outcome of one write: bytes the kernel took count as the liveness watch
    /// says (only for a peer without keepalives), and never for a keepalive
    /// (`shows_life: false`), which fits any send buffer.
    fn progress_as(
        &self,
        moved: Option<usize>,
        since: Instant,
        shows_life: bool,
    ) -> io::Result<()> {
        match (&self.watch, moved) {
            (Some(w), Some(n)) if n > 0 && shows_life => {
                w.live.wrote();
                Ok(())
            }
            (_, Some(_)) => Ok(()),
            (Some(w), None) => w
                .stalled(since)
                .map_err(|s| io::Error::new(io::ErrorKind::TimedOut, s)),
            (None, None) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// An error that ends a call: on a watched channel, the kernel's verdict on the link
    /// (`ETIMEDOUT`) is told as such.
    fn failed(&self, e: io::Error, since: Instant) -> io::Error {
        match &self.watch {
            Some(w) if e.raw_os_error() == Some(libc::ETIMEDOUT) => {
                io::Error::new(io::ErrorKind::TimedOut, w.dropped(since))
            }
            _ => e,
        }
    }

    /// Runs one read or write `op` until it moves bytes or fails, waiting as the watch
    /// allows. `Read` counts what arrives as the peer's life; `Write(shows_life)` says
    /// whether an accepted write does (see [`Self::progress_as`]).
    fn retry(&self, dir: Dir, mut op: impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
        let since = Instant::now();
        let progress = |moved| match dir {
            Dir::Read => self.progress(moved, since),
            Dir::Write(shows_life) => self.progress_as(moved, since, shows_life),
        };
        loop {
            match op() {
                Ok(n) => {
                    progress(Some(n))?;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => progress(None)?,
                Err(e) => return Err(self.failed(e, since)),
            }
        }
    }

    /// One read, waiting as the watch allows.
    fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.retry(Dir::Read, || self.s.read(buf))
    }

    /// One read handed to `sink` ([`MigrationStream::read_into`]), waiting as the
    /// watch allows.
    fn read_into_some(&self, max: usize, sink: &mut dyn FnMut(&[u8])) -> io::Result<usize> {
        self.retry(Dir::Read, || self.s.read_into(max, sink))
    }

    /// One vectored write, waiting as the watch allows.
    fn write_vectored_some(&self, bufs: &[&[u8]], shows_life: bool) -> io::Result<usize> {
        self.retry(Dir::Write(shows_life), || self.s.write_vectored(bufs))
    }

    /// One write, waiting as the watch allows.
    fn write_some(&self, buf: &[u8], shows_life: bool) -> io::Result<usize> {
        self.retry(Dir::Write(shows_life), || self.s.write(buf))
    }

    /// Takes the write lock, for one whole frame.
    pub(crate) fn lock(&self) -> Writer<'_> {
        Writer {
            ch: self,
            _g: self.wlock.lock().unwrap_or_else(|e| e.into_inner()),
            shows_life: true,
        }
    }

    /// The write lock if no other thread is writing a frame, for a keepalive: what is
    /// written through it is no sign of the peer's life.
    pub(crate) fn try_lock_for_keepalive(&self) -> Option<Writer<'_>> {
        let g = match self.wlock.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(Writer {
            ch: self,
            _g: g,
            shows_life: false,
        })
    }

    /// Writes `bufs` (buffers of the engine's own, never guest memory) in order, as
    /// one frame: see [`Writer::write_bufs`].
    pub(crate) fn write_bufs(&self, bufs: &[&[u8]]) -> io::Result<()> {
        self.lock().write_bufs(bufs)
    }

    /// Reads exactly `len` bytes from the stream, handing them to `sink` in order as
    /// they come ([`MigrationStream::read_into`]).
    pub(crate) fn read_into_full(
        &self,
        mut len: usize,
        sink: &mut dyn FnMut(&[u8]),
    ) -> io::Result<()> {
        while len > 0 {
            match self.read_into_some(len, sink)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => len -= n,
            }
        }
        Ok(())
    }

    /// Fills every byte `iov` describes from the socket `fd` (this channel's), waiting
    /// as the watch allows.
    ///
    /// # Safety
    ///
    /// As for [`super::iov::readv_all`].
    pub(crate) unsafe fn readv_all(&self, fd: RawFd, iov: &mut [libc::iovec]) -> io::Result<()> {
        let since = Instant::now();
        // SAFETY: the caller vouches for the iovecs.
        unsafe { super::iov::readv_all(fd, iov, &mut |m| self.progress(m, since)) }
            .map_err(|e| self.failed(e, since))
    }
}

/// A channel's write lock, held for one frame; frames are written through it.
pub(crate) struct Writer<'a> {
    ch: &'a Channel,
    _g: MutexGuard<'a, ()>,
    /// Whether bytes the kernel takes count as a sign of the peer's life.
    shows_life: bool,
}

impl Writer<'_> {
    /// Writes `bufs` (buffers of the engine's own, never guest memory) in order: one
    /// `writev` on a plain socket, vectored writes of the stream otherwise.
    pub(crate) fn write_bufs(&self, bufs: &[&[u8]]) -> io::Result<()> {
        if let Some(fd) = self.ch.raw_fd() {
            let mut iov: Vec<libc::iovec> = bufs
                .iter()
                .map(|b| libc::iovec {
                    iov_base: b.as_ptr() as *mut _,
                    iov_len: b.len(),
                })
                .collect();
            // SAFETY: every iovec describes one of `bufs`, alive and unchanged for the
            // call; the kernel only reads them.
            return unsafe { self.writev_all(fd, &mut iov) };
        }
        let mut rest: Vec<&[u8]> = bufs.iter().copied().filter(|b| !b.is_empty()).collect();
        let mut first = 0;
        while first < rest.len() {
            let mut n = match self
                .ch
                .write_vectored_some(&rest[first..], self.shows_life)?
            {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => n,
            };
            while n > 0 && first < rest.len() {
                let b = &mut rest[first];
                let k = n.min(b.len());
                *b = &b[k..];
                n -= k;
                if b.is_empty() {
                    first += 1;
                }
            }
        }
        Ok(())
    }

    /// Writes every byte `iov` describes to the socket `fd` (this channel's), waiting
    /// as the watch allows.
    ///
    /// # Safety
    ///
    /// As for [`super::iov::writev_all`].
    pub(crate) unsafe fn writev_all(&self, fd: RawFd, iov: &mut [libc::iovec]) -> io::Result<()> {
        let since = Instant::now();
        // SAFETY: the caller vouches for the iovecs.
        unsafe {
            super::iov::writev_all(fd, iov, &mut |m| {
                self.ch.progress_as(m, since, self.shows_life)
            })
        }
        .map_err(|e| self.ch.failed(e, since))
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_some(buf)
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_some(buf, true)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Which stream of a migration a [`Connector`] is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamRole {
    /// The main channel: the stream header, hello, state and the return path.
    Main,
    /// Data channel `i` of the hello's count.
    Data(u16),
}

/// How a source reaches its destination: the embedder's side of the source's
/// transport. Called on the migration thread, once for the main channel and once per
/// data channel; each call should give up in bounded time.
pub trait Connector: Send + Sync {
    fn connect(&self, role: StreamRole) -> io::Result<Channel>;

    /// Where the streams go, for messages (`tcp:10.0.0.2:4444`).
    fn describe(&self) -> String;
}

/// Where a destination's connections come from: the embedder's side of the
/// destination's transport. The engine sorts what arrives (the main channel, its data
/// channels, strays) by the header each connection opens with.
pub trait Acceptor: Send + 'static {
    /// Waits up to `within` for the next connection; `None` when none came. Returns the
    /// connection and a description of its peer, for logs.
    fn accept(&self, within: Duration) -> io::Result<Option<(Channel, String)>>;

    /// A descriptor that polls readable when a connection is waiting: the engine then
    /// waits on it and on its own wake-up together instead of calling [`accept`] in
    /// short rounds.
    ///
    /// [`accept`]: Acceptor::accept
    fn poll_fd(&self) -> Option<RawFd> {
        None
    }
}

/// Waits up to `within` for a connection on the listening socket `fd`: true when one
/// is waiting.
fn wait_readable(fd: RawFd, within: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = within.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd for the call's duration.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(r > 0 && p.revents & libc::POLLIN != 0)
}

/// A bound TCP listener as an acceptor: every connection to it is offered to the engine
/// (with `TCP_NODELAY` set, as the engine's frames want).
impl Acceptor for TcpListener {
    fn accept(&self, within: Duration) -> io::Result<Option<(Channel, String)>> {
        if !wait_readable(self.as_raw_fd(), within)? {
            return Ok(None);
        }
        let (s, a) = TcpListener::accept(self)?;
        s.set_nodelay(true)?;
        Ok(Some((Channel::new(s), a.to_string())))
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

/// A bound unix-socket listener as an acceptor.
impl Acceptor for UnixListener {
    fn accept(&self, within: Duration) -> io::Result<Option<(Channel, String)>> {
        if !wait_readable(self.as_raw_fd(), within)? {
            return Ok(None);
        }
        let peer = self
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
            .unwrap_or_else(|| "unix socket".into());
        Ok(Some((Channel::new(UnixListener::accept(self)?.0), peer)))
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every limit the `migration.liveness-timeout` range allows, doubled, is one the
    /// kernel takes (its probe count stops at 127).
    #[test]
    fn tcp_sockets_take_every_liveness_limit() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        for ms in [500u64, 1000, 5000, 120_000, 240_000, 1_200_000] {
            s.set_liveness(Duration::from_millis(ms))
                .unwrap_or_else(|e| panic!("{ms} ms: {e}"));
        }
    }
}
