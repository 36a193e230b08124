//! Where a migration goes: `tcp:HOST:PORT` or `unix:PATH`, and the connected channel.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
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

/// A connected migration channel.
#[derive(Debug)]
pub enum Channel {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Channel {
    /// Connects, giving up after `timeout` per address tried.
    pub fn connect(uri: &MigrationUri, timeout: Duration) -> io::Result<Self> {
        match uri {
            MigrationUri::Tcp(addr) => {
                let mut last = None;
                for a in addr.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Self::Tcp(s));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address")))
            }
            MigrationUri::Unix(p) => Ok(Self::Unix(UnixStream::connect(p)?)),
        }
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
        })
    }

    /// Closes both directions, waking any thread blocked on the channel.
    pub fn shutdown(&self) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(Shutdown::Both),
            Self::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Closes the reading side only: a thread blocked reading wakes with end of file,
    /// while writes (a reason for the peer) still go out.
    pub fn shutdown_read(&self) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(Shutdown::Read),
            Self::Unix(s) => s.shutdown(Shutdown::Read),
        };
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(t),
            Self::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_write_timeout(t),
            Self::Unix(s) => s.set_write_timeout(t),
        }
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Tcp(s) => s.as_raw_fd(),
            Self::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A bound listener for incoming migrations.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub fn bind(uri: &MigrationUri) -> io::Result<Self> {
        match uri {
            MigrationUri::Tcp(addr) => Ok(Self::Tcp(TcpListener::bind(addr)?)),
            MigrationUri::Unix(p) => {
                let _ = std::fs::remove_file(p);
                Ok(Self::Unix(UnixListener::bind(p)?, p.clone()))
            }
        }
    }

    /// The address actually bound (with the real port when 0 was asked).
    pub fn local_uri(&self) -> io::Result<MigrationUri> {
        match self {
            Self::Tcp(l) => Ok(MigrationUri::Tcp(l.local_addr()?.to_string())),
            Self::Unix(_, p) => Ok(MigrationUri::Unix(p.clone())),
        }
    }

    pub fn accept(&self) -> io::Result<Channel> {
        self.accept_from().map(|(c, _)| c)
    }

    /// Accepts a connection and says where it came from, for logs.
    pub fn accept_from(&self) -> io::Result<(Channel, String)> {
        match self {
            Self::Tcp(l) => {
                let (s, a) = l.accept()?;
                s.set_nodelay(true)?;
                Ok((Channel::Tcp(s), a.to_string()))
            }
            Self::Unix(l, p) => Ok((
                Channel::Unix(l.accept()?.0),
                format!("unix:{}", p.display()),
            )),
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Tcp(l) => l.as_raw_fd(),
            Self::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
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
