//! The reference VMM's transports: migration addresses `tcp:HOST:PORT` and `unix:PATH`,
//! dialled ([`MigrationUri`], a `Connector`) and listened on ([`Listener`], an
//! `Acceptor`), for the engine, which never dials or listens itself (see
//! `ferry_migration::engine::transport`). A unix path is taken only when nothing is
//! there or a socket nobody answers on ([`claim_unix_path`]), and a listener removes
//! only its own socket file.

use std::io;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_migration::engine::{
    Acceptor, Channel, Connector, Incoming, MigrationStream, StreamRole,
};
use thiserror::Error;

/// How long a connection attempt to one address may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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

impl MigrationUri {
    /// Connects to this address, giving up after `timeout` per address tried.
    pub fn connect_within(&self, timeout: Duration) -> io::Result<Channel> {
        Ok(match self.connect_socket(timeout)? {
            Socket::Tcp(s) => Channel::new(s),
            Socket::Unix(s) => Channel::new(s),
        })
    }

    /// The connected socket, for a transport that wraps it (TLS).
    pub fn connect_socket(&self, timeout: Duration) -> io::Result<Socket> {
        match self {
            MigrationUri::Tcp(addr) => {
                let mut last = None;
                for a in addr.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Socket::Tcp(s));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address")))
            }
            MigrationUri::Unix(p) => Ok(Socket::Unix(UnixStream::connect(p)?)),
        }
    }
}

/// A connected socket of either kind, under a transport that wraps it.
#[derive(Debug)]
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    fn stream(&self) -> &dyn MigrationStream {
        match self {
            Self::Tcp(s) => s,
            Self::Unix(s) => s,
        }
    }

    pub fn fd(&self) -> RawFd {
        match self {
            Self::Tcp(s) => s.as_raw_fd(),
            Self::Unix(s) => s.as_raw_fd(),
        }
    }

    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream().read(buf)
    }

    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.stream().write(buf)
    }

    /// Writes all of `b`, as the socket's write timeout allows.
    pub fn write_all_direct(&self, mut b: &[u8]) -> io::Result<()> {
        while !b.is_empty() {
            match self.write(b) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => b = &b[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub fn shutdown(&self, how: std::net::Shutdown) {
        self.stream().shutdown(how)
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.stream().set_read_timeout(t)
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.stream().set_write_timeout(t)
    }

    pub fn set_liveness(&self, limit: Duration) -> io::Result<()> {
        self.stream().set_liveness(limit)
    }
}

impl Connector for MigrationUri {
    fn connect(&self, _: StreamRole) -> io::Result<Channel> {
        self.connect_within(CONNECT_TIMEOUT)
    }

    fn describe(&self) -> String {
        self.to_string()
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

    /// Waits up to `within` for a connection and returns its socket (TCP with
    /// `TCP_NODELAY`), for a transport that wraps it.
    pub fn accept_socket(&self, within: Duration) -> io::Result<Option<(Socket, String)>> {
        let mut p = libc::pollfd {
            fd: self.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = within.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd for the call's duration.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r <= 0 || p.revents & libc::POLLIN == 0 {
            return Ok(None);
        }
        match self {
            Self::Tcp(l) => {
                let (s, a) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Some((Socket::Tcp(s), a.to_string())))
            }
            Self::Unix(l, p, _) => Ok(Some((
                Socket::Unix(l.accept()?.0),
                format!("unix:{}", p.display()),
            ))),
        }
    }

    /// The address actually bound (with the real port when 0 was asked).
    pub fn local_uri(&self) -> io::Result<MigrationUri> {
        match self {
            Self::Tcp(l) => Ok(MigrationUri::Tcp(l.local_addr()?.to_string())),
            Self::Unix(_, p, _) => Ok(MigrationUri::Unix(p.clone())),
        }
    }
}

impl Acceptor for Listener {
    fn accept(&self, within: Duration) -> io::Result<Option<(Channel, String)>> {
        match self {
            Self::Tcp(l) => Acceptor::accept(l, within),
            Self::Unix(l, _, _) => Acceptor::accept(l, within),
        }
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

impl From<Listener> for Incoming {
    fn from(l: Listener) -> Self {
        Incoming::acceptor(l)
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
