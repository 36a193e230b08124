//! TLS 1.3 with mutual x509 authentication for migration streams: the credentials
//! ([`TlsCreds`], laid out in a directory as QEMU's `tls-creds-x509` object reads them),
//! the stream ([`TlsStream`], a [`MigrationStream`]), the source's [`TlsDialer`] and the
//! destination's [`TlsAcceptor`], and [`make_test_creds`] behind `ferry tls-creds`.
//!
//! # Choices
//!
//! * **rustls** (0.23), TLS 1.3 only: memory-safe, no system OpenSSL to match across
//!   hosts, and an API that leaves the socket to us, which the locking below needs.
//!   TLS 1.2 is not offered: both ends are ferry, and 1.3 has one round trip less and
//!   no renegotiation.
//! * **Crypto provider: ring**, with the suites in the order AES-128-GCM, AES-256-GCM,
//!   ChaCha20-Poly1305. ring's AES-GCM uses AES-NI, carry-less multiply and VAES where
//!   the CPU has them (the hosts here do), several GB/s a core, and it builds with a C
//!   compiler alone. rustls 0.23.48 deprecates its ring provider for lacking post-quantum
//!   key exchange (X25519MLKEM768, in the aws-lc-rs provider only): moving to aws-lc-rs
//!   is a change of [`provider`] and of the Cargo features, and buys hybrid key exchange
//!   against traffic recorded now and decrypted later, but on these hosts its AES-128-GCM
//!   costs about twice ring's CPU per GiB (`bench/aead` measures both side by side;
//!   BENCHMARKS.md, "ring or aws-lc-rs"), which the data path would pay at each end.
//! * **No kernel TLS here.** Handing the keys to the kernel after the handshake (kTLS)
//!   would let pages go out with `writev` straight from guest memory, as xen-api did;
//!   the kernels ferry runs on so far offer no `tls` ULP
//!   (`/proc/sys/net/ipv4/tcp_available_ulp` lists only `mptcp`), so records are sealed in
//!   userspace and [`MigrationStream::raw_fd`] is `None`: the engine copies pages
//!   through its buffer.
//! * **Large records, few syscalls, few copies.** A write seals up to [`MAX_WRITE`]
//!   bytes at once, as 16 KiB records (the TLS maximum), and the records go from
//!   rustls' buffers to the kernel by one `sendmsg` of many of them; a read takes up to
//!   [`RX_BUF`] bytes of records from the kernel at once (rustls would read 4 KiB at a
//!   time from a socket). A frame's head and pages are sealed by one vectored write
//!   ([`MigrationStream::write_vectored`]), and pages are read by handing the engine
//!   rustls' opened plaintext where it lies ([`MigrationStream::read_into`]), so the
//!   engine copies it into guest memory without a buffer of its own in between.
//!
//! # Locking
//!
//! A migration reads the return path on one thread while another writes the same
//! stream, so reads and writes take `&self` and must not wait for each other's socket
//! calls. Three locks:
//!
//! * `tls`, the rustls connection state, is held only to seal or open records in memory
//!   and for non-blocking `sendmsg` calls, never while waiting for the socket;
//! * `rx`, the read order, is held by a reader across its socket read, so records are
//!   opened in the order they arrived;
//! * `tx`, the send order, is held by a writer while it sends. Sealed records wait in
//!   rustls' own queue in the order they were sealed, and only the `tx` holder takes
//!   them off it (non-blocking, under `tls`); when the socket is full it waits for it to
//!   drain with `poll`, holding `tx` only, so a blocked send never blocks the reader. A
//!   reader that has to send something (a handshake message, an alert) leaves it queued
//!   and sends only if `tx` is free; otherwise the holder sends it with its own.
//!
//! A socket timeout (the engine polls with 200 ms ones, see the engine's `liveness`)
//! surfaces as `WouldBlock`/`TimedOut` and loses nothing: bytes read stay in `rx` until
//! rustls takes them, sealed bytes stay queued. A write that sealed its bytes and then
//! timed out sending them reports the timeout and, on the caller's next write (which
//! repeats the same bytes, as the engine's `Channel` does), finishes sending and reports
//! them written, so `Ok(n)` always means the kernel has the records.
//!
//! # Handshake bounds
//!
//! A destination's handshake runs in the first reads of the engine's door thread, under
//! `migration.handshake-timeout` for the whole (a peer that stalls is cut then), and a
//! peer may send at most 128 KiB before its handshake completes. A refused peer is read
//! until it closes, for at most 2 s more, so that it reads the refusal (an alert, or a
//! refusal frame) instead of a connection reset.
//!
//! # Policy
//!
//! The destination tells a TLS ClientHello (`0x16 0x03`, a handshake record) from ferry's
//! plaintext stream header by the first bytes. A plaintext source is answered with a
//! refusal frame it can read (any ferry release can), saying the destination requires
//! TLS; nothing falls back. A source asked for TLS that gets a plaintext refusal back, or
//! a closed connection, says the destination did not take TLS.
//!
//! # Identity of data channels
//!
//! The destination takes the client certificate's subject CN (else its first SAN) as
//! the peer's identity ([`MigrationStream::peer_identity`]); `tls-authz` lists the
//! identities (CN, SAN or the whole subject) allowed in. The engine binds a data channel
//! only if it presents the same identity as the main channel, so a channel from another
//! holder of a certificate of the same CA is turned away as a stray even if it knows
//! the session id.

use std::io::{self, BufRead, Read, Write};
use std::net::Shutdown;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use ferry_migration::engine::{Acceptor, Channel, Connector, MigrationStream, StreamRole};
use ferry_migration::wire::{
    ChannelHeader, FrameHeader, FrameTag, Refuse, RefuseCause, StreamHeader, CHANNEL_MAGIC, MAGIC,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use thiserror::Error;

use crate::transport::{Listener, MigrationUri, Socket};

/// The files of a credentials directory, as QEMU names them.
pub const CA_CERT: &str = "ca-cert.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

/// Plaintext sealed by one write at most: 64 records of 16 KiB.
pub const MAX_WRITE: usize = 1 << 20;
/// Bytes of records taken from the kernel by one read at most.
pub const RX_BUF: usize = 256 << 10;
/// Bytes a peer may send before its handshake is done: a certificate chain, with room.
const MAX_HANDSHAKE_BYTES: usize = 128 << 10;
/// How long a refused peer has to finish sending what it sent before our answer, so
/// that closing does not reset the connection under the answer.
const DRAIN: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("TLS credentials in {dir}: cannot read {file}")]
    Read {
        dir: PathBuf,
        file: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("TLS credentials in {dir}: {file}: {reason}")]
    Bad {
        dir: PathBuf,
        file: &'static str,
        reason: String,
    },
    #[error("TLS credentials in {dir} have no {cert} and {key}, which the {side} needs")]
    Missing {
        dir: PathBuf,
        cert: &'static str,
        key: &'static str,
        side: &'static str,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("tls-hostname {0:?} is not a DNS name or IP address")]
    Hostname(String),
    #[error("cannot write test credentials: {0}")]
    Make(String),
}

type CertKey = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// Credentials as QEMU's `tls-creds-x509` reads them from a directory: the CA that
/// vouches for the peer, and this side's certificate and key (server for a destination,
/// client for a source; a directory may hold both).
#[derive(Debug)]
pub struct TlsCreds {
    pub dir: PathBuf,
    roots: Arc<RootCertStore>,
    server: Option<CertKey>,
    client: Option<CertKey>,
}

impl Clone for TlsCreds {
    fn clone(&self) -> Self {
        let ck = |c: &Option<CertKey>| c.as_ref().map(|(c, k)| (c.clone(), k.clone_key()));
        Self {
            dir: self.dir.clone(),
            roots: Arc::clone(&self.roots),
            server: ck(&self.server),
            client: ck(&self.client),
        }
    }
}

fn read_file(dir: &Path, file: &'static str) -> Result<Option<Vec<u8>>, TlsError> {
    match std::fs::read(dir.join(file)) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TlsError::Read {
            dir: dir.into(),
            file,
            source: e,
        }),
    }
}

fn certs(
    dir: &Path,
    file: &'static str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::Bad {
        dir: dir.into(),
        file,
        reason,
    };
    let v = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
    if v.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    Ok(v)
}

fn pair(dir: &Path, cert: &'static str, key: &'static str) -> Result<Option<CertKey>, TlsError> {
    match (read_file(dir, cert)?, read_file(dir, key)?) {
        (None, None) => Ok(None),
        (Some(c), Some(k)) => {
            let chain = certs(dir, cert, &c)?;
            let key_der = PrivateKeyDer::from_pem_slice(&k).map_err(|e| TlsError::Bad {
                dir: dir.into(),
                file: key,
                reason: format!("no private key: {e}"),
            })?;
            Ok(Some((chain, key_der)))
        }
        (Some(_), None) => Err(TlsError::Bad {
            dir: dir.into(),
            file: key,
            reason: format!("missing, and {cert} needs it"),
        }),
        (None, Some(_)) => Err(TlsError::Bad {
            dir: dir.into(),
            file: cert,
            reason: format!("missing, and {key} needs it"),
        }),
    }
}

/// The provider: ring, TLS 1.3 suites with AES-GCM first.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    // Deprecated for lacking post-quantum key exchange (X25519MLKEM768, which only the
    // aws-lc-rs provider has); see the module's docs.
    #[allow(deprecated)]
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

impl TlsCreds {
    /// Reads `dir`: `ca-cert.pem` and at least one of the server and client pairs.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let ca = read_file(dir, CA_CERT)?.ok_or_else(|| TlsError::Read {
            dir: dir.into(),
            file: CA_CERT,
            source: io::ErrorKind::NotFound.into(),
        })?;
        let mut roots = RootCertStore::empty();
        for c in certs(dir, CA_CERT, &ca)? {
            roots.add(c).map_err(|e| TlsError::Bad {
                dir: dir.into(),
                file: CA_CERT,
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let server = pair(dir, SERVER_CERT, SERVER_KEY)?;
        let client = pair(dir, CLIENT_CERT, CLIENT_KEY)?;
        if server.is_none() && client.is_none() {
            return Err(TlsError::Bad {
                dir: dir.into(),
                file: SERVER_CERT,
                reason: format!(
                    "missing, as is {CLIENT_CERT}: a destination needs {SERVER_CERT} and \
                     {SERVER_KEY}, a source {CLIENT_CERT} and {CLIENT_KEY}"
                ),
            });
        }
        Ok(Self {
            dir: dir.into(),
            roots: Arc::new(roots),
            server,
            client,
        })
    }

    /// The destination's configuration: its server certificate, and client certificates
    /// required and checked against the CA.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let (chain, key) = self.server.as_ref().ok_or_else(|| TlsError::Missing {
            dir: self.dir.clone(),
            cert: SERVER_CERT,
            key: SERVER_KEY,
            side: "destination",
        })?;
        let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::clone(&self.roots),
            provider(),
        )
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut c = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(cfg)?;
        // No resumption: every migration authenticates afresh, and no ticket is sent
        // that a source would have to read.
        c.send_tls13_tickets = 0;
        c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        c.max_fragment_size = None;
        Ok(Arc::new(c))
    }

    /// The source's configuration: its client certificate, and the destination's
    /// certificate checked against the CA.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let (chain, key) = self.client.as_ref().ok_or_else(|| TlsError::Missing {
            dir: self.dir.clone(),
            cert: CLIENT_CERT,
            key: CLIENT_KEY,
            side: "source",
        })?;
        let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
        let mut c = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .with_root_certificates(Arc::clone(&self.roots))
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(cfg)?;
        c.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(c))
    }
}

/// The identities a certificate names: its subject's CNs, then its SANs (DNS, e-mail,
/// URI, IP), then the whole subject (`CN=alice,O=...`).
pub fn cert_identities(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, c)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let mut ids: Vec<String> = c
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                    ids.push((*s).to_string())
                }
                GeneralName::IPAddress(b) => match b.len() {
                    4 => ids.push(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()),
                    16 => {
                        let a: [u8; 16] = (*b).try_into().unwrap_or([0; 16]);
                        ids.push(std::net::Ipv6Addr::from(a).to_string())
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    ids.push(c.subject().to_string());
    ids
}

/// Which end of the handshake a stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Client,
    Server,
}

/// The rustls connection. Its queue of sealed records (rustls' `sendable_tls`) is the
/// send order: only the holder of `tx` takes records off it, onto the socket.
struct Tls {
    conn: rustls::Connection,
    /// Peer bytes taken while handshaking.
    handshake_bytes: usize,
    /// The first bytes were looked at (a server tells TLS from plaintext).
    sniffed: bool,
    /// Why the stream failed, for every later call.
    failed: Option<(io::ErrorKind, String)>,
}

/// Bytes read from the socket that rustls has not taken yet.
struct Rx {
    buf: Box<[u8]>,
    at: usize,
    end: usize,
}

/// The send order, and what the caller's last write sealed.
#[derive(Default)]
struct Tx {
    /// Plaintext bytes sealed by a write whose sending timed out: reported written by the
    /// next write once sent.
    carry: usize,
}

/// What a server checks once the handshake is done.
struct ServerPolicy {
    /// The identities allowed in (`tls-authz`), read at each handshake; `None`: any
    /// certificate the CA vouches for.
    authz: Arc<dyn Fn() -> Option<Vec<String>> + Send + Sync>,
}

struct Shared {
    sock: Socket,
    role: Role,
    tls: Mutex<Tls>,
    rx: Mutex<Rx>,
    tx: Mutex<Tx>,
    /// The write timeout, in microseconds (`u64::MAX`: none): a blocked send waits this
    /// long for the socket to take bytes, polling it without a lock held.
    wto: AtomicU64,
    identity: OnceLock<Option<String>>,
    policy: Option<ServerPolicy>,
    /// Where the peer is, for messages.
    peer: String,
}

/// A TLS 1.3 stream over a TCP or unix socket: see the module's docs.
#[derive(Clone)]
pub struct TlsStream(Arc<Shared>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A socket written without blocking: rustls hands it many records at once
/// (`write_vectored`, one `sendmsg`); `WouldBlock` when the socket is full.
struct NonBlocking(RawFd);

impl Write for NonBlocking {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: a zeroed msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
        // SAFETY: IoSlice is ABI-compatible with iovec; every slice is alive and unchanged
        // for the call, and the kernel only reads them.
        let n = unsafe { libc::sendmsg(self.0, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Waits up to `within` (`None`: for ever) for `events` on `fd`: false when the time ran
/// out. An error or hang-up counts as ready: the next call on the socket says which.
fn wait_for(fd: RawFd, events: libc::c_short, within: Option<Duration>) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = within.map_or(-1, |d| {
        d.as_millis().clamp(1, i32::MAX as u128) as libc::c_int
    });
    // SAFETY: one valid pollfd for the call's duration.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(true)
        } else {
            Err(e)
        };
    }
    Ok(r > 0)
}

/// A refusal frame, as every ferry release reads it in answer to its hello.
fn refuse_frame(reason: &str) -> Vec<u8> {
    let payload = Refuse {
        cause: RefuseCause::Security,
        reason: reason.into(),
    }
    .encode();
    let mut f = FrameHeader {
        tag: FrameTag::Refuse,
        len: payload.len() as u32,
    }
    .encode()
    .to_vec();
    f.extend_from_slice(&payload);
    f
}

impl TlsStream {
    fn new(
        sock: Socket,
        conn: rustls::Connection,
        role: Role,
        policy: Option<ServerPolicy>,
        peer: String,
    ) -> Self {
        let mut conn = conn;
        // A write seals at most MAX_WRITE, and `tx` sends it before the next: the bound
        // is ours, not rustls' (64 KiB by default, which would cut writes short).
        conn.set_buffer_limit(None);
        Self(Arc::new(Shared {
            sock,
            role,
            tls: Mutex::new(Tls {
                conn,
                handshake_bytes: 0,
                sniffed: role == Role::Client,
                failed: None,
            }),
            rx: Mutex::new(Rx {
                buf: vec![0u8; RX_BUF].into_boxed_slice(),
                at: 0,
                end: 0,
            }),
            tx: Mutex::new(Tx::default()),
            wto: AtomicU64::new(u64::MAX),
            identity: OnceLock::new(),
            policy,
            peer,
        }))
    }

    /// Connects as the source: the handshake runs here, within `timeout`; the
    /// destination's certificate must be valid for `name`.
    pub fn connect(
        sock: Socket,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        timeout: Duration,
        peer: String,
    ) -> io::Result<Self> {
        let conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
        let s = Self::new(sock, conn.into(), Role::Client, None, peer);
        let deadline = Instant::now() + timeout;
        let r = s.client_handshake(deadline);
        let _ = s.0.sock.set_read_timeout(None);
        let _ = s.set_wto(None);
        r.map(|_| s)
    }

    /// A destination's side of a connection just accepted. The handshake runs in the
    /// first reads (on the engine's door thread, under its handshake deadline), so an
    /// accept never waits for a peer.
    fn accept(
        sock: Socket,
        config: Arc<ServerConfig>,
        policy: ServerPolicy,
        peer: String,
    ) -> io::Result<Self> {
        let conn = ServerConnection::new(config).map_err(io::Error::other)?;
        Ok(Self::new(
            sock,
            conn.into(),
            Role::Server,
            Some(policy),
            peer,
        ))
    }

    /// Fails the stream for good with `msg`: every later call gets the same error.
    fn fail(&self, t: &mut Tls, kind: io::ErrorKind, msg: String) -> io::Error {
        if t.failed.is_none() {
            t.failed = Some((kind, msg.clone()));
        }
        io::Error::new(kind, msg)
    }

    fn failed(t: &Tls) -> Option<io::Error> {
        t.failed
            .as_ref()
            .map(|(k, m)| io::Error::new(*k, m.clone()))
    }

    /// Sets the write timeout: on the socket (for the few direct writes) and for the
    /// waits of [`Self::send`].
    fn set_wto(&self, t: Option<Duration>) -> io::Result<()> {
        let us = t.map_or(u64::MAX, |d| d.as_micros().min(u64::MAX as u128 - 1) as u64);
        self.0.wto.store(us, Ordering::Relaxed);
        self.0.sock.set_write_timeout(t)
    }

    /// Sends the records rustls has sealed, in order, as the holder of `tx`: one
    /// non-blocking `sendmsg` of many records at a time straight from rustls' buffers,
    /// under `tls` (it never waits there), and the wait for the socket to take more
    /// without any lock. A write timeout leaves what is unsent queued (`WouldBlock`).
    fn send(&self, _tx: &mut Tx) -> io::Result<()> {
        let fd = self.0.sock.fd();
        loop {
            let r = {
                let mut t = lock(&self.0.tls);
                if !t.conn.wants_write() {
                    return Ok(());
                }
                t.conn.write_tls(&mut NonBlocking(fd))
            };
            match r {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let us = self.0.wto.load(Ordering::Relaxed);
                    let within = (us != u64::MAX).then(|| Duration::from_micros(us));
                    if !wait_for(fd, libc::POLLOUT, within)? {
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends what is queued if no writer is sending (a writer sends it with its own).
    fn send_if_free(&self) -> io::Result<()> {
        loop {
            match self.0.tx.try_lock() {
                Ok(mut tx) => match self.send(&mut tx) {
                    Ok(()) => {}
                    Err(e) if would_block(&e) => return Ok(()),
                    Err(e) => return Err(e),
                },
                Err(std::sync::TryLockError::Poisoned(e)) => {
                    let mut tx = e.into_inner();
                    self.send(&mut tx)?;
                }
                Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
            }
            // A writer may have let go after its last look at the queue.
            if !lock(&self.0.tls).conn.wants_write() {
                return Ok(());
            }
        }
    }

    /// Sends everything queued, waiting as the socket's write timeout allows per call.
    fn send_all(&self, deadline: Instant) -> io::Result<()> {
        let mut tx = lock(&self.0.tx);
        loop {
            match self.send(&mut tx) {
                Ok(()) => return Ok(()),
                Err(e) if would_block(&e) && Instant::now() < deadline => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Feeds rustls what `rx` holds and opens the records. Under `rx` and `tls`.
    fn feed(&self, t: &mut Tls, rx: &mut Rx) -> io::Result<()> {
        while rx.at < rx.end {
            let handshaking = t.conn.is_handshaking();
            let n = match t.conn.read_tls(&mut &rx.buf[rx.at..rx.end]) {
                Ok(n) => n,
                // rustls holds as much plaintext as it will: the caller reads some first.
                Err(e) if e.kind() == io::ErrorKind::Other && !t.conn.wants_read() => 0,
                Err(e) => return Err(self.fail(t, io::ErrorKind::InvalidData, e.to_string())),
            };
            rx.at += n;
            if handshaking {
                t.handshake_bytes += n;
                if t.handshake_bytes > MAX_HANDSHAKE_BYTES {
                    return Err(self.fail(
                        t,
                        io::ErrorKind::InvalidData,
                        format!(
                            "the TLS handshake from {} went past {} KiB",
                            self.0.peer,
                            MAX_HANDSHAKE_BYTES >> 10
                        ),
                    ));
                }
            }
            if let Err(e) = t.conn.process_new_packets() {
                // rustls queues an alert for the peer; the caller sends it.
                let msg = self.explain(&e);
                return Err(self.fail(t, io::ErrorKind::PermissionDenied, msg));
            }
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    /// A rustls error, told for a migration.
    fn explain(&self, e: &rustls::Error) -> String {
        use rustls::{AlertDescription as A, Error as E};
        match (self.0.role, e) {
            (Role::Client, E::InvalidCertificate(c)) => format!(
                "TLS: the destination's certificate at {} is refused: {c:?} ({e}); check \
                 tls-hostname and that the destination's certificate comes from the CA in this \
                 source's tls-creds",
                self.0.peer
            ),
            (Role::Server, E::InvalidCertificate(c)) => {
                format!("TLS: the source's client certificate is refused: {c:?} ({e})")
            }
            (Role::Server, E::NoCertificatesPresented) => {
                "TLS: the source presented no client certificate (this destination requires one)"
                    .into()
            }
            (Role::Client, E::AlertReceived(a))
                if matches!(
                    a,
                    A::BadCertificate
                        | A::UnknownCA
                        | A::CertificateExpired
                        | A::CertificateRevoked
                        | A::CertificateUnknown
                        | A::UnsupportedCertificate
                        | A::CertificateRequired
                        | A::AccessDenied
                        | A::DecryptError
                ) =>
            {
                format!(
                    "TLS: the destination at {} refused this source's client certificate \
                     (alert {a:?}); check that it comes from the CA in the destination's \
                     tls-creds and is valid now",
                    self.0.peer
                )
            }
            (Role::Client, _) => format!("TLS with the destination at {}: {e}", self.0.peer),
            (Role::Server, _) => format!("TLS with the source: {e}"),
        }
    }

    /// Reads from the socket into `rx` (emptied first). `Ok(0)` at end of file.
    fn fill(&self, rx: &mut Rx) -> io::Result<usize> {
        rx.at = 0;
        rx.end = 0;
        loop {
            match self.0.sock.read(&mut rx.buf) {
                Ok(n) => {
                    rx.end = n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The source's handshake, before the stream is handed to the engine.
    fn client_handshake(&self, deadline: Instant) -> io::Result<()> {
        let mut rx = lock(&self.0.rx);
        let mut first = true;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "TLS: the destination at {} did not complete the handshake in time",
                        self.0.peer
                    ),
                ));
            }
            if !lock(&self.0.tls).conn.is_handshaking() {
                return self.send_all(deadline);
            }
            self.set_wto(Some(left))?;
            self.send_all(deadline)?;
            self.0.sock.set_read_timeout(Some(left))?;
            match self.fill(&mut rx) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!(
                            "TLS: this source requires TLS and the destination at {} closed \
                             the connection during the handshake: it takes plaintext \
                             migrations only (started without --tls-creds, or a ferry release \
                             before 0.3), or it turned this connection away (see its log)",
                            self.0.peer
                        ),
                    ))
                }
                Ok(_) => {}
                Err(e) if would_block(&e) => continue,
                Err(e) => return Err(e),
            }
            if first {
                first = false;
                // A TLS server answers with a handshake (0x16) or alert (0x15) record;
                // a plaintext ferry destination answers with a refusal frame.
                if rx.buf[0] == FrameTag::Refuse as u8 {
                    return Err(self.plaintext_refusal(&mut rx, deadline));
                }
            }
            let mut t = lock(&self.0.tls);
            if let Err(e) = self.feed(&mut t, &mut rx) {
                drop(t);
                let _ = self.send_all(deadline);
                return Err(e);
            }
        }
    }

    /// Reads the plaintext refusal a destination answered a ClientHello with.
    fn plaintext_refusal(&self, rx: &mut Rx, deadline: Instant) -> io::Error {
        let mut got = rx.buf[..rx.end].to_vec();
        let reason = loop {
            if got.len() >= FrameHeader::LEN {
                let fh: [u8; FrameHeader::LEN] = got[..FrameHeader::LEN].try_into().unwrap();
                if let Ok(h) = FrameHeader::decode(&fh) {
                    let end = FrameHeader::LEN + h.len as usize;
                    if got.len() >= end {
                        break Refuse::decode(&got[FrameHeader::LEN..end])
                            .map(|r| r.reason)
                            .ok();
                    }
                } else {
                    break None;
                }
            }
            if Instant::now() >= deadline {
                break None;
            }
            match self.fill(rx) {
                Ok(0) => break None,
                Ok(n) => got.extend_from_slice(&rx.buf[..n]),
                Err(e) if would_block(&e) => {}
                Err(_) => break None,
            }
        };
        io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "TLS: this source requires TLS (ferry migrate --tls / tls-creds) and the \
                 destination at {} answered in plaintext: {}",
                self.0.peer,
                reason.unwrap_or_else(|| "a refusal that does not decode".into())
            ),
        )
    }

    /// A server's first look at the bytes: a TLS record goes on, a plaintext ferry
    /// connection is refused in words it can read, anything else is turned away.
    fn sniff(&self, t: &mut Tls, rx: &mut Rx) -> io::Result<()> {
        t.sniffed = true;
        let b = &rx.buf[rx.at..rx.end];
        if b[0] == 0x16 && (b.len() < 2 || b[1] == 0x03) {
            return Ok(());
        }
        let plaintext = MAGIC.starts_with(&b[..b.len().min(8)])
            || CHANNEL_MAGIC.starts_with(&b[..b.len().min(8)]);
        if !plaintext {
            return Err(self.fail(
                t,
                io::ErrorKind::InvalidData,
                format!(
                    "neither a TLS handshake nor a ferry migration stream (first bytes {:02x?})",
                    &b[..b.len().min(8)]
                ),
            ));
        }
        let reason = "the destination requires TLS (ferry run --tls-creds); this source \
                      connected in plaintext (ferry migrate --tls, or QMP migrate-set-parameters \
                      tls-creds, turns TLS on)";
        let err = self.fail(t, io::ErrorKind::PermissionDenied, reason.into());
        Err(self.refuse_plaintext(rx, reason, err))
    }

    /// Reads the plaintext header and hello a source sent (so that closing does not reset
    /// the connection under the answer), then answers with a refusal frame.
    fn refuse_plaintext(&self, rx: &mut Rx, reason: &str, err: io::Error) -> io::Error {
        let deadline = Instant::now() + DRAIN;
        let mut got = rx.buf[rx.at..rx.end].to_vec();
        rx.at = rx.end;
        let _ = self.0.sock.set_read_timeout(Some(DRAIN));
        let need = |got: &[u8]| -> Option<usize> {
            if got.starts_with(&CHANNEL_MAGIC) {
                return Some(ChannelHeader::LEN);
            }
            if got.len() < StreamHeader::LEN + FrameHeader::LEN {
                return Some(StreamHeader::LEN + FrameHeader::LEN);
            }
            let fh: [u8; FrameHeader::LEN] = got
                [StreamHeader::LEN..StreamHeader::LEN + FrameHeader::LEN]
                .try_into()
                .ok()?;
            let h = FrameHeader::decode(&fh).ok()?;
            Some(StreamHeader::LEN + FrameHeader::LEN + h.len as usize)
        };
        while let Some(n) = need(&got) {
            if got.len() >= n || Instant::now() >= deadline {
                break;
            }
            match self.fill(rx) {
                Ok(0) | Err(_) => break,
                Ok(k) => got.extend_from_slice(&rx.buf[..k]),
            }
            rx.at = rx.end;
        }
        let _ = self.0.sock.set_write_timeout(Some(DRAIN));
        let _ = self.0.sock.write_all_direct(&refuse_frame(reason));
        self.linger(rx, deadline);
        err
    }

    /// Closes our side and reads until the peer closes or `deadline`, so the peer reads
    /// our last words before the connection goes.
    fn linger(&self, rx: &mut Rx, deadline: Instant) {
        self.0.sock.shutdown(Shutdown::Write);
        while Instant::now() < deadline {
            let _ = self.0.sock.set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ));
            match self.fill(rx) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if would_block(&e) => {}
                Err(_) => break,
            }
        }
        rx.at = rx.end;
    }

    /// A server's checks once its handshake is done: the peer's identity, and
    /// `tls-authz`. Under `tls`.
    fn handshake_done(&self, t: &mut Tls) -> io::Result<()> {
        let ids = t
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(cert_identities)
            .unwrap_or_default();
        let id = ids.first().cloned();
        let _ = self.0.identity.set(id.clone());
        let Some(policy) = &self.0.policy else {
            return Ok(());
        };
        let Some(allowed) = (policy.authz)() else {
            return Ok(());
        };
        if ids.iter().any(|i| allowed.contains(i)) {
            return Ok(());
        }
        let reason = format!(
            "the source's client identity {:?} is not authorised to migrate into this VM \
             (tls-authz allows {})",
            id.as_deref().unwrap_or("(none)"),
            allowed.join(", ")
        );
        let err = self.fail(t, io::ErrorKind::PermissionDenied, reason.clone());
        // Said inside TLS, where the source reads its answer.
        let _ = t.conn.writer().write_all(&refuse_frame(&reason));
        t.conn.send_close_notify();
        // Sent, and the peer's last bytes read, by the caller without the tls lock.
        Err(err)
    }
}

impl TlsStream {
    /// A read: once rustls holds plaintext, `take` takes some of it from rustls' reader
    /// (under `rx` and `tls`) and says how much; until then records are read and opened
    /// (and the handshake run) as the module's docs say.
    fn read_with(
        &self,
        take: &mut dyn FnMut(rustls::Reader<'_>) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut rx = lock(&self.0.rx);
        loop {
            let mut refused = None;
            {
                let mut t = lock(&self.0.tls);
                if let Some(e) = Self::failed(&t) {
                    return Err(e);
                }
                if !t.conn.is_handshaking() {
                    match take(t.conn.reader()) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!(
                                    "the TLS connection with {} closed without close_notify",
                                    self.0.peer
                                ),
                            ))
                        }
                        Err(e) => return Err(e),
                    }
                }
                if rx.at < rx.end {
                    if !t.sniffed {
                        self.sniff(&mut t, &mut rx)?;
                    }
                    let was = t.conn.is_handshaking();
                    let fed = self.feed(&mut t, &mut rx);
                    if let Err(e) = fed {
                        drop(t);
                        let deadline = Instant::now() + DRAIN;
                        let _ = self.set_wto(Some(DRAIN));
                        let _ = self.send_all(deadline);
                        if self.0.role == Role::Server {
                            // The source may be sending its hello already: read it until the
                            // source closes, so that it reads our alert rather than a reset.
                            self.linger(&mut rx, deadline);
                        }
                        return Err(e);
                    }
                    if was && !t.conn.is_handshaking() && self.0.role == Role::Server {
                        if let Err(e) = self.handshake_done(&mut t) {
                            refused = Some(e);
                        }
                    }
                    let any = t.conn.wants_write();
                    drop(t);
                    if let Some(e) = refused {
                        let deadline = Instant::now() + DRAIN;
                        let _ = self.set_wto(Some(DRAIN));
                        let _ = self.send_all(deadline);
                        self.linger(&mut rx, deadline);
                        return Err(e);
                    }
                    if any {
                        self.send_if_free()?;
                    }
                    continue;
                }
            }
            if self.fill(&mut rx)? == 0 {
                let mut t = lock(&self.0.tls);
                if t.conn.is_handshaking() {
                    let msg = match self.0.role {
                        Role::Server if !t.sniffed => "the peer closed the connection before sending anything".to_string(),
                        Role::Server => "the source closed the connection during the TLS handshake (it may have refused this destination's certificate; see its log)".to_string(),
                        Role::Client => format!("the destination at {} closed the connection during the TLS handshake", self.0.peer),
                    };
                    return Err(self.fail(&mut t, io::ErrorKind::UnexpectedEof, msg));
                }
                // Tells rustls of the end of file; the next round reads what is left.
                let _ = t.conn.read_tls(&mut &[][..]);
                let _ = t.conn.process_new_packets();
                match take(t.conn.reader()) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Seals up to [`MAX_WRITE`] bytes from the start of `bufs` and sends the records.
    fn seal_and_send(&self, bufs: &[&[u8]]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        let mut tx = lock(&self.0.tx);
        self.send(&mut tx)?;
        if tx.carry > 0 {
            let n = std::mem::take(&mut tx.carry);
            return Ok(n.min(total));
        }
        let mut left = MAX_WRITE;
        let slices: Vec<io::IoSlice<'_>> = bufs
            .iter()
            .map_while(|b| {
                let k = b.len().min(left);
                left -= k;
                (left > 0 || k > 0).then(|| io::IoSlice::new(&b[..k]))
            })
            .collect();
        let n;
        {
            let mut t = lock(&self.0.tls);
            if let Some(e) = Self::failed(&t) {
                return Err(e);
            }
            if t.conn.is_handshaking() {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "a write before the TLS handshake finished",
                ));
            }
            // One call for all the slices: rustls cuts full records across them, so a
            // frame's head does not go out as a record of its own. Without a buffer
            // limit (see `new`) it takes them all.
            n = t.conn.writer().write_vectored(&slices)?;
        }
        match self.send(&mut tx) {
            Ok(()) => Ok(n),
            Err(e) if would_block(&e) => {
                tx.carry = n;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }
}

impl MigrationStream for TlsStream {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.read_with(&mut |mut r| r.read(buf))
    }

    /// Hands out rustls' plaintext where it lies, up to `max` bytes, as far as it has
    /// opened records: the engine copies it from there into guest memory.
    fn read_into(&self, max: usize, sink: &mut dyn FnMut(&[u8])) -> io::Result<usize> {
        if max == 0 {
            return Ok(0);
        }
        self.read_with(&mut |mut r| {
            let mut n = 0;
            while n < max {
                let c = match r.fill_buf() {
                    Ok([]) => break,
                    Ok(c) => c,
                    Err(_) if n > 0 => break,
                    Err(e) => return Err(e),
                };
                let k = c.len().min(max - n);
                sink(&c[..k]);
                r.consume(k);
                n += k;
            }
            Ok(n)
        })
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.seal_and_send(&[buf])
    }

    fn write_vectored(&self, bufs: &[&[u8]]) -> io::Result<usize> {
        self.seal_and_send(bufs)
    }

    fn try_clone(&self) -> io::Result<Box<dyn MigrationStream>> {
        Ok(Box::new(self.clone()))
    }

    fn shutdown(&self, how: Shutdown) {
        self.0.sock.shutdown(how);
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.0.sock.set_read_timeout(t)
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_wto(t)
    }

    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        // Bytes are sealed on the way: pages take the engine's buffered path.
        None
    }

    fn set_liveness(&self, limit: Duration) -> io::Result<()> {
        self.0.sock.set_liveness(limit)
    }

    fn peer_identity(&self) -> Option<String> {
        self.0.identity.get().cloned().flatten()
    }
}

/// The source's connector: each stream dialled and wrapped in TLS before the engine
/// sees it.
pub struct TlsDialer {
    pub uri: MigrationUri,
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
    pub handshake_timeout: Duration,
}

impl TlsDialer {
    /// `hostname` (tls-hostname) or, without one, the host of a `tcp:` address.
    pub fn new(
        uri: MigrationUri,
        creds: &TlsCreds,
        hostname: Option<&str>,
        handshake_timeout: Duration,
    ) -> Result<Self, TlsError> {
        let host = match (hostname, &uri) {
            (Some(h), _) => h.to_string(),
            (None, MigrationUri::Tcp(a)) => a
                .rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string())
                .unwrap_or_default(),
            (None, MigrationUri::Unix(_)) => "localhost".to_string(),
        };
        let name = ServerName::try_from(host.clone()).map_err(|_| TlsError::Hostname(host))?;
        Ok(Self {
            config: creds.client_config()?,
            uri,
            name,
            handshake_timeout,
        })
    }
}

impl Connector for TlsDialer {
    fn connect(&self, _: StreamRole) -> io::Result<Channel> {
        let sock = self.uri.connect_socket(crate::transport::CONNECT_TIMEOUT)?;
        let s = TlsStream::connect(
            sock,
            Arc::clone(&self.config),
            self.name.clone(),
            self.handshake_timeout,
            self.uri.to_string(),
        )?;
        Ok(Channel::new(s))
    }

    fn describe(&self) -> String {
        format!("{} (TLS, server name {})", self.uri, self.name.to_str())
    }
}

/// The destination's acceptor: each connection wrapped in TLS, its handshake left to
/// the engine's door thread (see [`TlsStream::accept`]).
pub struct TlsAcceptor {
    pub listener: Listener,
    pub config: Arc<ServerConfig>,
    pub authz: Arc<dyn Fn() -> Option<Vec<String>> + Send + Sync>,
}

impl Acceptor for TlsAcceptor {
    fn accept(&self, within: Duration) -> io::Result<Option<(Channel, String)>> {
        let Some((sock, peer)) = self.listener.accept_socket(within)? else {
            return Ok(None);
        };
        let s = TlsStream::accept(
            sock,
            Arc::clone(&self.config),
            ServerPolicy {
                authz: Arc::clone(&self.authz),
            },
            peer.clone(),
        )?;
        Ok(Some((Channel::new(s), peer)))
    }

    fn poll_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.listener.as_raw_fd())
    }
}

/// What `ferry tls-creds` writes.
#[derive(Debug, Clone)]
pub struct TestCredsSpec {
    /// Names and addresses the server certificate is valid for.
    pub server_names: Vec<String>,
    /// The client certificate's identity (subject CN and a DNS SAN).
    pub client_name: String,
    /// Days the certificates are valid; negative for certificates that expired that many
    /// days ago (for tests).
    pub days: i64,
}

/// A CA and certificates signed by it, for tests and demos (`ferry tls-creds`).
pub struct TestCa {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    pem: String,
}

fn mk(e: rcgen::Error) -> TlsError {
    TlsError::Make(e.to_string())
}

fn validity(p: &mut rcgen::CertificateParams, days: i64) {
    let now = rcgen::date_time_ymd(2000, 1, 1)
        + (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(Duration::from_secs(946_684_800)));
    if days >= 0 {
        p.not_before = now - Duration::from_secs(3600);
        p.not_after = now + Duration::from_secs(days as u64 * 86_400);
    } else {
        let ago = Duration::from_secs(days.unsigned_abs() * 86_400);
        p.not_before = now - ago - Duration::from_secs(30 * 86_400);
        p.not_after = now - ago;
    }
}

impl TestCa {
    pub fn new(name: &str) -> Result<Self, TlsError> {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(mk)?;
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut p, 3650);
        let key = rcgen::KeyPair::generate().map_err(mk)?;
        let pem = p.self_signed(&key).map_err(mk)?.pem();
        Ok(Self {
            params: p,
            key,
            pem,
        })
    }

    /// A certificate and key signed by this CA, as PEM.
    fn issue(
        &self,
        cn: &str,
        sans: &[String],
        client: bool,
        days: i64,
    ) -> Result<(String, String), TlsError> {
        let mut p = rcgen::CertificateParams::new(sans.to_vec()).map_err(mk)?;
        p.distinguished_name
            .push(rcgen::DnType::CommonName, cn.to_string());
        p.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        // No key usage extension: rcgen marks it critical, and QEMU's tls-creds-x509 refuses
        // a critical one without keyEncipherment ("usage does not permit key encipherment"),
        // which RFC 5480 forbids for these ECDSA keys. Without the extension QEMU assumes
        // what it wants, rustls does not look, and the extended key usage still limits each
        // certificate to its side.
        p.key_usages = Vec::new();
        validity(&mut p, days);
        let key = rcgen::KeyPair::generate().map_err(mk)?;
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(&key, &issuer).map_err(mk)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes a credentials directory: `ca-cert.pem`, the server pair and the client
    /// pair (keys readable by their owner only).
    pub fn write_dir(&self, dir: &Path, spec: &TestCredsSpec) -> Result<(), TlsError> {
        let io = |e: io::Error| TlsError::Make(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        let cn = spec
            .server_names
            .first()
            .cloned()
            .unwrap_or_else(|| "localhost".into());
        let (sc, sk) = self.issue(&cn, &spec.server_names, false, spec.days)?;
        let dns_like = !spec.client_name.is_empty()
            && spec
                .client_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        let client_sans = if dns_like {
            vec![spec.client_name.clone()]
        } else {
            Vec::new()
        };
        let (cc, ck) = self.issue(&spec.client_name, &client_sans, true, spec.days)?;
        for (f, text, secret) in [
            (CA_CERT, &self.pem, false),
            (SERVER_CERT, &sc, false),
            (SERVER_KEY, &sk, true),
            (CLIENT_CERT, &cc, false),
            (CLIENT_KEY, &ck, true),
        ] {
            write_file(&dir.join(f), text.as_bytes(), secret).map_err(io)?;
        }
        Ok(())
    }
}

fn write_file(path: &Path, b: &[u8], secret: bool) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    if secret {
        o.mode(0o600);
    }
    o.open(path)?.write_all(b)
}

/// A fresh CA and a credentials directory signed by it (`ferry tls-creds`).
pub fn make_test_creds(dir: &Path, spec: &TestCredsSpec) -> Result<(), TlsError> {
    TestCa::new("ferry test CA")?.write_dir(dir, spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-tls-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn spec(client: &str) -> TestCredsSpec {
        TestCredsSpec {
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            client_name: client.into(),
            days: 1,
        }
    }

    /// A connected client and server stream over loopback TCP. The server's handshake
    /// runs in its first read, as on the engine's door thread: here, of one byte the
    /// client sends once connected. The server side is that read's error when it fails.
    fn pair(dir: &Path, authz: Option<Vec<String>>) -> (TlsStream, Result<TlsStream, String>) {
        let creds = TlsCreds::load(dir).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let sc = creds.server_config().unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let s = TlsStream::accept(
                Socket::Tcp(s),
                sc,
                ServerPolicy {
                    authz: Arc::new(move || authz.clone()),
                },
                "test".into(),
            )
            .unwrap();
            let mut b = [0u8; 1];
            match s.read(&mut b) {
                Ok(1) if b[0] == 0xa5 => Ok(s),
                Ok(n) => Err(format!("{n} bytes ({b:?}) in place of the sync byte")),
                Err(e) => Err(e.to_string()),
            }
        });
        let c = TlsStream::connect(
            Socket::Tcp(TcpStream::connect(addr).unwrap()),
            creds.client_config().unwrap(),
            ServerName::try_from("localhost").unwrap(),
            Duration::from_secs(5),
            addr.to_string(),
        )
        .unwrap();
        write_all(&c, &[0xa5]).unwrap();
        (c, server.join().unwrap())
    }

    fn read_exact(s: &TlsStream, mut b: &mut [u8]) -> io::Result<()> {
        while !b.is_empty() {
            match s.read(b) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => b = &mut b[n..],
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_all(s: &TlsStream, mut b: &[u8]) -> io::Result<()> {
        while !b.is_empty() {
            match s.write(b) {
                Ok(n) => b = &b[n..],
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A client and server connected with alice's credentials in scratch directory
    /// `name`, both with 200 ms socket timeouts (which fire all along in the tests).
    fn timed_pair(name: &str) -> (PathBuf, TlsStream, TlsStream) {
        let d = scratch(name);
        make_test_creds(&d, &spec("alice")).unwrap();
        let (c, s) = pair(&d, None);
        let s = s.unwrap();
        for x in [&c, &s] {
            x.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            x.set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
        }
        (d, c, s)
    }

    /// Both directions at once, on two threads per side, with 200 ms socket timeouts
    /// firing all along (the receiver is slowed): every byte arrives, in order, and the
    /// server learns the client's identity.
    #[test]
    fn bytes_cross_both_ways_at_once_through_socket_timeouts() {
        let (d, c, s) = timed_pair("both");
        const N: usize = 24 << 20;
        let data: Arc<Vec<u8>> = Arc::new((0..N).map(|i| (i * 7 + i / 4096) as u8).collect());
        let mut threads = Vec::new();
        for (w, r) in [(c.clone(), s.clone()), (s.clone(), c.clone())] {
            let d1 = Arc::clone(&data);
            threads.push(std::thread::spawn(move || {
                for chunk in d1.chunks(300_000) {
                    write_all(&w, chunk).unwrap();
                }
            }));
            let d2 = Arc::clone(&data);
            threads.push(std::thread::spawn(move || {
                let mut got = vec![0u8; N];
                for (k, chunk) in got.chunks_mut(4096).enumerate() {
                    if k % 1024 == 0 {
                        std::thread::sleep(Duration::from_millis(250));
                    }
                    read_exact(&r, chunk).unwrap();
                }
                assert!(got == *d2, "bytes differ");
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.peer_identity().as_deref(), Some("alice"));
        assert_eq!(c.peer_identity(), None);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Frames written as several slices and read by handing out rustls' plaintext
    /// arrive whole and in order, through socket timeouts and across the bound of one
    /// write, as the engine's pages do.
    #[test]
    fn vectored_writes_and_handed_out_reads_keep_every_byte_in_order() {
        let (d, c, s) = timed_pair("vectored");
        const N: usize = 12 << 20;
        let data: Arc<Vec<u8>> = Arc::new((0..N).map(|i| (i * 13 + i / 4096) as u8).collect());
        let d1 = Arc::clone(&data);
        let w = std::thread::spawn(move || {
            // Heads of 24 bytes, pages of MAX_WRITE - 8 and more: writes that stop
            // inside a slice and go on from there.
            let mut at = 0;
            for k in 0.. {
                if at == N {
                    break;
                }
                let head = 24.min(N - at);
                let body = (MAX_WRITE - 8 + k * 4096).min(N - at - head);
                let mut bufs = [
                    &d1[at..at + head],
                    &[][..],
                    &d1[at + head..at + head + body],
                ];
                let mut first = 0;
                while first < bufs.len() {
                    let mut n = match c.write_vectored(&bufs[first..]) {
                        Ok(n) => n,
                        Err(e) if would_block(&e) => continue,
                        Err(e) => panic!("{e}"),
                    };
                    while first < bufs.len() && n >= bufs[first].len() {
                        n -= bufs[first].len();
                        first += 1;
                    }
                    if first < bufs.len() {
                        bufs[first] = &bufs[first][n..];
                    }
                }
                at += head + body;
            }
        });
        let mut got = Vec::with_capacity(N);
        let mut k = 0;
        while got.len() < N {
            if k % 64 == 0 {
                std::thread::sleep(Duration::from_millis(30));
            }
            k += 1;
            let max = (100_000 + k * 977).min(N - got.len());
            match s.read_into(max, &mut |b| got.extend_from_slice(b)) {
                Ok(0) => panic!("end of file after {} bytes", got.len()),
                Ok(n) => assert!(n <= max),
                Err(e) if would_block(&e) => {}
                Err(e) => panic!("{e}"),
            }
        }
        w.join().unwrap();
        assert!(got == *data, "bytes differ");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_identity_outside_tls_authz_is_refused_by_name() {
        let d = scratch("authz");
        make_test_creds(&d, &spec("mallory")).unwrap();
        let (c, s) = pair(&d, Some(vec!["alice".into(), "bob".into()]));
        let e = s.err().unwrap();
        assert!(e.contains("\"mallory\"") && e.contains("alice, bob"), "{e}");
        // The source reads the refusal, inside TLS, where it waits for its answer.
        let mut got = vec![0u8; 512];
        let mut at = 0;
        while let Ok(k) = c.read(&mut got[at..]) {
            if k == 0 {
                break;
            }
            at += k;
        }
        let text = String::from_utf8_lossy(&got[..at]).to_string();
        assert!(text.contains("\"mallory\" is not authorised"), "{text}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn credentials_say_which_file_is_wrong() {
        let d = scratch("files");
        std::fs::create_dir_all(&d).unwrap();
        let e = TlsCreds::load(&d).unwrap_err().to_string();
        assert!(e.contains(CA_CERT), "{e}");
        make_test_creds(&d, &spec("alice")).unwrap();
        std::fs::remove_file(d.join(SERVER_KEY)).unwrap();
        let e = TlsCreds::load(&d).unwrap_err().to_string();
        assert!(e.contains(SERVER_KEY) && e.contains("missing"), "{e}");
        std::fs::remove_file(d.join(SERVER_CERT)).unwrap();
        let c = TlsCreds::load(&d).unwrap();
        let e = c.server_config().unwrap_err().to_string();
        assert!(e.contains("destination"), "{e}");
        assert!(c.client_config().is_ok());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn identities_are_the_cn_then_the_sans() {
        let ca = TestCa::new("ca").unwrap();
        let (pem, _) = ca
            .issue(
                "alice",
                &["alice.example".into(), "10.0.0.1".into()],
                true,
                1,
            )
            .unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let ids = cert_identities(&der);
        assert_eq!(&ids[..3], ["alice", "alice.example", "10.0.0.1"]);
        assert!(ids[3].contains("CN=alice"), "{ids:?}");
    }

    /// QEMU's tls-creds-x509 loads these credentials too: it refuses a server or client
    /// certificate whose key usage is critical and lacks digitalSignature or
    /// keyEncipherment, and a CA whose critical key usage lacks keyCertSign.
    #[test]
    fn the_test_credentials_pass_qemus_key_usage_check() {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let ca = TestCa::new("ca").unwrap();
        for client in [false, true] {
            let (pem, _) = ca.issue("x", &["localhost".into()], client, 1).unwrap();
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            let (_, c) = X509Certificate::from_der(der.as_ref()).unwrap();
            if let Ok(Some(ku)) = c.key_usage() {
                assert!(
                    !ku.critical || (ku.value.digital_signature() && ku.value.key_encipherment()),
                    "client {client}: critical key usage {:?}",
                    ku.value
                );
            }
        }
        let der = CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap();
        let (_, c) = X509Certificate::from_der(der.as_ref()).unwrap();
        let ku = c.key_usage().unwrap().expect("the CA names its key usage");
        assert!(ku.value.key_cert_sign());
    }
}
