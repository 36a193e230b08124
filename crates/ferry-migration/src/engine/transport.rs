//! Transports: the byte streams a migration runs over, handed to the engine by its
//! embedder ([`MigrationStream`], [`Connector`], [`Acceptor`]), and their implementation
//! for `tcp:HOST:PORT` and `unix:PATH` ([`MigrationUri`], [`Listener`]).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

/// A parsed migration address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    Tcp(String),
    Unix(PathBuf),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum UriError {
    #[error("migration address {0:?}: expected tcp:HOST:PORT or unix:PATH")]
    Scheme(String),
    #[error("migration address {0:?}: expected HOST:PORT after tcp:")]
    TcpAddr(String),
    #[error("migration address {0:?}: empty path after unix:")]
    UnixPath(String),
}

impl std::str::FromStr for MigrationUri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, UriError> {
        if let Some(rest) = s.strip_prefix("tcp:") {
            match rest.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(Self::Tcp(rest.to_string()))
                }
                _ => Err(UriError::TcpAddr(s.to_string())),
            }
        } else if let Some(rest) = s.strip_prefix("unix:") {
            if rest.is_empty() {
                Err(UriError::UnixPath(s.to_string()))
            } else {
                Ok(Self::Unix(rest.into()))
            }
        } else {
            Err(UriError::Scheme(s.to_string()))
        }
    }
}

impl std::fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp:{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected byte stream to the other side: what the engine migrates over.
///
/// The engine never dials or listens on its own: the embedder hands it streams through
/// a [`Connector`] (source) or an [`Acceptor`] (destination), so a migration can run over
/// TCP, a unix socket, TLS, vsock or a descriptor its management layer passed in. This
/// module implements the trait for plain sockets ([`TcpStream`], [`UnixStream`]) and the
/// two traits for `tcp:` and `unix:` addresses ([`MigrationUri`], [`Listener`]).
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

    /// Connects to a `tcp:` or `unix:` address, giving up after `timeout` per address
    /// tried.
    pub fn connect(uri: &MigrationUri, timeout: Duration) -> io::Result<Self> {
        match uri {
            MigrationUri::Tcp(addr) => {
                let mut last = None;
                for a in addr.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Self::new(s));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address")))
            }
            MigrationUri::Unix(p) => Ok(Self::new(UnixStream::connect(p)?)),
        }
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

impl Connector for MigrationUri {
    fn connect(&self, _: StreamRole) -> io::Result<Channel> {
        Channel::connect(self, Duration::from_secs(10))
    }

    fn describe(&self) -> String {
        self.to_string()
    }
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

/// A bound listener for incoming migrations.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// The listener, its path, and the socket file's identity when it was bound.
    Unix(UnixListener, PathBuf, Option<(u64, u64)>),
}

/// Clears the way for a unix socket at `path`, destroying nothing that is in use:
/// nothing there is fine, and a socket nobody answers on (left by a process that is
/// gone) is removed. Anything else is refused with an error that names it: a regular
/// file, a directory or anything that is not a socket (`AlreadyExists`), and a socket a
/// process is listening on (`AddrInUse`).
pub fn claim_unix_path(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; remove it or choose another path",
                path.display()
            ),
        ));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is in use by a listening socket; choose another path",
                path.display()
            ),
        ));
    }
    std::fs::remove_file(path)
}

/// The device and inode of the socket file at `path`, to tell it from one that
/// replaced it.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Listener {
    /// Listens on `uri`. A `unix:` path is taken only if nothing is there or a stale
    /// socket is ([`claim_unix_path`]).
    pub fn bind(uri: &MigrationUri) -> io::Result<Self> {
        match uri {
            MigrationUri::Tcp(addr) => Ok(Self::Tcp(TcpListener::bind(addr)?)),
            MigrationUri::Unix(p) => {
                claim_unix_path(p)?;
                let l = UnixListener::bind(p)?;
                let id = file_id(p);
                Ok(Self::Unix(l, p.clone(), id))
            }
        }
    }

    /// The address actually bound (with the real port when 0 was asked).
    pub fn local_uri(&self) -> io::Result<MigrationUri> {
        match self {
            Self::Tcp(l) => Ok(MigrationUri::Tcp(l.local_addr()?.to_string())),
            Self::Unix(_, p, _) => Ok(MigrationUri::Unix(p.clone())),
        }
    }

    /// Accepts a connection and says where it came from, for logs.
    pub fn accept_from(&self) -> io::Result<(Channel, String)> {
        match self {
            Self::Tcp(l) => {
                let (s, a) = l.accept()?;
                s.set_nodelay(true)?;
                Ok((Channel::new(s), a.to_string()))
            }
            Self::Unix(l, p, _) => {
                Ok((Channel::new(l.accept()?.0), format!("unix:{}", p.display())))
            }
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Self::Tcp(l) => l.as_raw_fd(),
            Self::Unix(l, _, _) => l.as_raw_fd(),
        }
    }
}

impl Acceptor for Listener {
    fn accept(&self, within: Duration) -> io::Result<Option<(Channel, String)>> {
        let mut p = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = within.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd for the call's duration.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if r == 0 || p.revents & libc::POLLIN == 0 {
            return Ok(None);
        }
        self.accept_from().map(Some)
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.fd())
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Tcp(l) => l.as_raw_fd(),
            Self::Unix(l, _, _) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Only our own socket file: another process may have put its own there since.
        if let Self::Unix(_, p, Some(id)) = self {
            if file_id(p) == Some(*id) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_and_print_back() {
        for s in ["tcp:127.0.0.1:4444", "tcp:[::1]:1", "unix:/tmp/x.sock"] {
            let u: MigrationUri = s.parse().unwrap();
            assert_eq!(u.to_string(), s);
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-claim-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_unix_listener_never_destroys_what_is_at_its_path() {
        let d = scratch("paths");
        // A regular file: refused, and left as it was.
        let file = d.join("file");
        std::fs::write(&file, b"precious").unwrap();
        let e = Listener::bind(&MigrationUri::Unix(file.clone())).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(e.to_string().contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
        // A directory: refused.
        let dir = d.join("dir");
        std::fs::create_dir(&dir).unwrap();
        assert!(Listener::bind(&MigrationUri::Unix(dir.clone())).is_err());
        assert!(dir.is_dir());
        // A socket another listener answers on: refused, and it still answers.
        let live = d.join("live.sock");
        let other = UnixListener::bind(&live).unwrap();
        let e = Listener::bind(&MigrationUri::Unix(live.clone())).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(
            e.to_string().contains("in use by a listening socket"),
            "{e}"
        );
        assert!(UnixStream::connect(&live).is_ok());
        drop(other);
        // A stale socket (its listener gone): replaced.
        let l = Listener::bind(&MigrationUri::Unix(live.clone())).unwrap();
        assert!(UnixStream::connect(&live).is_ok());
        drop(l);
        assert!(!live.exists(), "the listener removes its own socket file");
        // A socket file that replaced ours is not removed when ours goes.
        let ours = Listener::bind(&MigrationUri::Unix(live.clone())).unwrap();
        std::fs::remove_file(&live).unwrap();
        let theirs = UnixListener::bind(&live).unwrap();
        drop(ours);
        assert!(
            UnixStream::connect(&live).is_ok(),
            "another's socket was removed"
        );
        drop(theirs);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn bad_uris_say_what_is_expected() {
        for s in [
            "127.0.0.1:4444",
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "unix:",
        ] {
            let e = s.parse::<MigrationUri>().unwrap_err().to_string();
            assert!(e.contains(s), "{e}");
        }
    }
}
