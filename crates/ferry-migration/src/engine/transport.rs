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
use std::time::Duration;

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
pub struct Channel(Box<dyn MigrationStream>);

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("fd", &self.0.raw_fd())
            .finish()
    }
}

impl Channel {
    pub fn new(stream: impl MigrationStream) -> Self {
        Self(Box::new(stream))
    }

    pub fn from_boxed(stream: Box<dyn MigrationStream>) -> Self {
        Self(stream)
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }

    /// Closes both directions, waking any thread blocked on the channel.
    pub fn shutdown(&self) {
        self.0.shutdown(Shutdown::Both);
    }

    /// Closes the reading side only: a thread blocked reading wakes with end of file,
    /// while writes (a reason for the peer) still go out.
    pub fn shutdown_read(&self) {
        self.0.shutdown(Shutdown::Read);
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.0.set_read_timeout(t)
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.0.set_write_timeout(t)
    }

    /// The socket's descriptor when pages may be moved by `writev`/`readv` on it.
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.0.raw_fd()
    }

    /// Writes `bufs` (buffers of the engine's own, never guest memory) in order: one
    /// `writev` on a plain socket, one write each otherwise.
    pub(crate) fn write_bufs(&self, bufs: &[&[u8]]) -> io::Result<()> {
        if let Some(fd) = self.raw_fd() {
            let mut iov: Vec<libc::iovec> = bufs
                .iter()
                .map(|b| libc::iovec {
                    iov_base: b.as_ptr() as *mut _,
                    iov_len: b.len(),
                })
                .collect();
            // SAFETY: every iovec describes one of `bufs`, alive and unchanged for the
            // call; the kernel only reads them.
            return unsafe { super::iov::writev_all(fd, &mut iov) };
        }
        for b in bufs {
            self.write_all_shared(b)?;
        }
        Ok(())
    }

    /// Fills `buf` from the stream (a buffer of the engine's own).
    pub(crate) fn read_full(&self, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.0.read(buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_all_shared(&self, mut b: &[u8]) -> io::Result<()> {
        while !b.is_empty() {
            match self.0.write(b) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => b = &b[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
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
