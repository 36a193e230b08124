//! Migrations over TLS between real `ferry` processes on loopback TCP: a 4-channel
//! migration completes with memory verified; each way the security can be wrong (CA,
//! expiry, hostname, tls-authz, plaintext against TLS both ways) is refused with a
//! message naming the cause while the source keeps running, and a correct retry then
//! completes; peers that stall mid-handshake or send garbage do not hold the destination.
//! A data channel presenting another client identity is turned away (in process, with a
//! connector that dials that channel with other credentials). And across two network
//! namespaces, a capture of the veth shows guest memory in the clear for a plaintext
//! migration and not for a TLS one.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{Link, Side};
use common::*;
use ferry_migration::engine::{self, Channel, Connector, SourceIdentity, StreamRole};
use ferry_vmm::tls::{TestCa, TestCredsSpec, TlsCreds, TlsDialer};
use ferry_vmm::transport::MigrationUri;
use ferry_vmm::vmm::{Backend, Vmm, VmmConfig};
use serde_json::{json, Value};

/// A soft guest that keeps dirtying 8 MiB and has 16 MiB of incompressible data; the
/// source verifies all of memory at the end.
const SRC: &[&str] = &[
    "--backend",
    "soft",
    "--mem",
    "128M",
    "--dirty",
    "8M",
    "--fill",
    "16M",
    "-global",
    "migration.verify-full=on",
];
const DST: &[&str] = &["--backend", "soft", "--mem", "128M"];

fn spec(client: &str, days: i64) -> TestCredsSpec {
    TestCredsSpec {
        server_names: vec!["localhost".into(), "127.0.0.1".into()],
        client_name: client.into(),
        days,
    }
}

/// Credentials of `ca` in `dir/name`.
fn creds(ca: &TestCa, dir: &TestDir, name: &str, client: &str, days: i64) -> PathBuf {
    let p = dir.join(name);
    ca.write_dir(&p, &spec(client, days)).unwrap();
    p
}

/// `ferry run ARGS` whose QMP socket answers.
fn start(dir: &TestDir, name: &str, args: &[&str]) -> Vm {
    let mut vm = Vm::start(dir, name, args);
    let _ = vm.qmp();
    vm
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `ferry migrate --qmp SRC URI --channels 4 --json ARGS`.
fn migrate(dir: &TestDir, src: &Vm, uri: &str, args: &[&str]) -> Output {
    let mut a = vec![
        "migrate",
        "--qmp",
        src.qmp_path(),
        uri,
        "--channels",
        "4",
        "--json",
    ];
    a.extend(args);
    ferry_in(dir, &a, MIGRATE_TIMEOUT)
}

fn assert_completed(out: &Output, src: &Vm, dst: &Vm) {
    let ctx = format!("{out}{}{}", src.ctx(), dst.ctx());
    assert!(out.status.success(), "{ctx}");
    let last = out.last_json();
    assert_eq!(last["status"], "completed", "{ctx}");
    assert_eq!(last["verified"], "digest+full", "{ctx}");
}

/// The migration failed with a message holding every one of `needles`, and the source
/// still runs its guest, memory intact.
fn assert_refused(out: &Output, src: &mut Vm, dst: &Vm, needles: &[&str]) {
    let ctx = format!("{out}{}{}", src.ctx(), dst.ctx());
    assert!(!out.status.success(), "the migration succeeded\n{ctx}");
    let text = format!("{}{}", out.stdout, out.stderr);
    for n in needles {
        assert!(text.contains(n), "no {n:?} in the failure\n{ctx}");
    }
    let mut q = src.qmp();
    assert_eq!(run_state(&mut q), "running", "{ctx}");
    assert_guest_progresses(&mut q, "source");
    assert_guest_intact(&mut q, "source");
}

#[test]
fn four_channels_over_tls_complete_with_memory_verified() {
    let _g = serial();
    let dir = TestDir::new("tls-4ch");
    let ca = TestCa::new("test CA").unwrap();
    let c = creds(&ca, &dir, "creds", "alice", 1);
    let dst = Vm::incoming(
        &dir,
        "dst",
        &[DST, &["--tls-creds", s(&c), "--tls-authz", "alice"]].concat(),
    );
    let src = start(&dir, "src", &[SRC, &["--tls-creds", s(&c)]].concat());
    let out = migrate(&dir, &src, &dst.uri(), &["--tls"]);
    assert_completed(&out, &src, &dst);
    assert!(
        dst.log().contains("TLS with the credentials in"),
        "{}",
        dst.ctx()
    );
}

#[test]
fn migrate_tls_without_credentials_fails_before_anything_moves() {
    let _g = serial();
    let dir = TestDir::new("tls-nocreds");
    let src = start(&dir, "src", SRC);
    let out = migrate(&dir, &src, "tcp:127.0.0.1:1", &["--tls"]);
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("has no TLS credentials"), "{out}");
}

/// One way of getting security wrong: the destination's and the source's arguments, the
/// QMP parameters that then fix the source, and what the refusal must say.
struct Case {
    name: &'static str,
    dst: Vec<String>,
    src: Vec<String>,
    fix: Value,
    says: Vec<&'static str>,
}

#[test]
fn each_wrong_setting_is_refused_by_name_and_a_correct_retry_completes() {
    let _g = serial();
    let dir = TestDir::new("tls-refusals");
    let ca = TestCa::new("test CA").unwrap();
    let other = TestCa::new("another CA").unwrap();
    let good = creds(&ca, &dir, "good", "alice", 1);
    let foreign = creds(&other, &dir, "foreign", "alice", 1);
    let expired = creds(&ca, &dir, "expired", "alice", -2);
    let mallory = creds(&ca, &dir, "mallory", "mallory", 1);
    let g = s(&good).to_string();
    let tls_dst = vec![
        "--tls-creds".to_string(),
        g.clone(),
        "--tls-authz".into(),
        "alice".into(),
    ];
    let with = |p: &Path| vec!["--tls-creds".to_string(), s(p).to_string()];
    let cases = [
        Case {
            name: "wrong CA",
            dst: tls_dst.clone(),
            src: with(&foreign),
            fix: json!({ "tls-creds": g }),
            says: vec!["destination's certificate", "UnknownIssuer"],
        },
        Case {
            name: "expired client certificate",
            dst: tls_dst.clone(),
            src: with(&expired),
            fix: json!({ "tls-creds": g }),
            says: vec![
                "refused this source's client certificate",
                "CertificateExpired",
            ],
        },
        Case {
            name: "wrong hostname",
            dst: tls_dst.clone(),
            src: [
                with(&good),
                vec!["--tls-hostname".into(), "db.example".into()],
            ]
            .concat(),
            fix: json!({ "tls-hostname": "" }),
            says: vec!["NotValidForName", "db.example", "tls-hostname"],
        },
        Case {
            name: "identity not in tls-authz",
            dst: tls_dst.clone(),
            src: with(&mallory),
            fix: json!({ "tls-creds": g }),
            says: vec!["mallory", "is not authorised", "tls-authz allows alice"],
        },
        Case {
            name: "plaintext source, TLS destination",
            dst: tls_dst.clone(),
            src: vec![],
            fix: json!({ "tls-creds": g }),
            says: vec![
                "the destination requires TLS (ferry run --tls-creds)",
                "this source connected in plaintext",
            ],
        },
        Case {
            name: "TLS source, plaintext destination",
            dst: vec![],
            src: with(&good),
            fix: json!({ "tls-creds": "" }),
            says: vec![
                "this source requires TLS",
                "this destination takes plaintext migrations",
            ],
        },
    ];
    for c in cases {
        let dst_args: Vec<&str> = DST
            .iter()
            .copied()
            .chain(c.dst.iter().map(String::as_str))
            .collect();
        let src_args: Vec<&str> = SRC
            .iter()
            .copied()
            .chain(c.src.iter().map(String::as_str))
            .collect();
        let dst = Vm::incoming(
            &dir,
            &format!("dst-{}", c.name.replace(' ', "-")),
            &dst_args,
        );
        let mut src = start(
            &dir,
            &format!("src-{}", c.name.replace(' ', "-")),
            &src_args,
        );
        let uri = dst.uri();
        let started = Instant::now();
        let out = migrate(&dir, &src, &uri, &[]);
        assert_refused(&out, &mut src, &dst, &c.says);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{}: the refusal took {:?}",
            c.name,
            started.elapsed()
        );
        exec(&mut src.qmp(), "migrate-set-parameters", c.fix.clone());
        let out = migrate(&dir, &src, &uri, &[]);
        assert_completed(&out, &src, &dst);
        println!("{}: refused as it should be, then completed", c.name);
    }
}

/// Connections that stall in the middle of a TLS handshake, send garbage, or send a
/// ClientHello and nothing more, are cut at the handshake deadline; a real migration
/// meanwhile completes.
#[test]
fn stalled_and_garbage_peers_do_not_hold_a_tls_destination() {
    let _g = serial();
    let dir = TestDir::new("tls-stall");
    let ca = TestCa::new("test CA").unwrap();
    let c = creds(&ca, &dir, "creds", "alice", 1);
    let dst = Vm::incoming(&dir, "dst", &[DST, &["--tls-creds", s(&c)]].concat());
    let uri = dst.uri();
    let addr = uri.strip_prefix("tcp:").unwrap().to_string();
    let mut held = Vec::new();
    for bytes in [
        &b""[..],
        &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00][..],
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0x16, 0x03, 0x03, 0xff, 0xff, 0xde, 0xad, 0xbe, 0xef][..],
    ] {
        let mut t = TcpStream::connect(&addr).unwrap();
        t.write_all(bytes).unwrap();
        held.push(t);
    }
    let src = start(&dir, "src", &[SRC, &["--tls-creds", s(&c)]].concat());
    let out = migrate(&dir, &src, &uri, &[]);
    assert_completed(&out, &src, &dst);
    drop(held);
}

/// A connector whose data channel 1 presents other credentials (another client of the
/// same CA): the destination must turn it away, not bind it.
struct Impostor {
    main: TlsDialer,
    other: TlsDialer,
}

impl Connector for Impostor {
    fn connect(&self, role: StreamRole) -> std::io::Result<Channel> {
        match role {
            StreamRole::Data(1) => self.other.connect(role),
            _ => self.main.connect(role),
        }
    }

    fn describe(&self) -> String {
        self.main.describe()
    }
}

fn source_identity(vmm: &Vmm) -> SourceIdentity {
    SourceIdentity {
        release: ferry_vmm::machine::RELEASE.to_string(),
        machine: vmm.config().machine().to_string(),
        wire_props: vmm.config().wire_properties(),
        compat_pinned: vmm.config().compat_pinned_wire_properties(),
    }
}

#[test]
fn a_data_channel_with_another_identity_is_a_stray_and_a_correct_retry_completes() {
    let dir = TestDir::new("tls-impostor");
    let ca = TestCa::new("test CA").unwrap();
    let alice = creds(&ca, &dir, "alice", "alice", 1);
    let bob = creds(&ca, &dir, "bob", "bob", 1);
    let vm = |incoming: bool| {
        Vmm::new(&VmmConfig {
            backend: Backend::Soft,
            mem_size: 64 << 20,
            dirty_size: if incoming { 0 } else { 4 << 20 },
            fill: if incoming { 0 } else { 8 << 20 },
            incoming,
            ..VmmConfig::default()
        })
        .unwrap()
    };
    let src = vm(false);
    let mut params = src.params();
    params.multifd_channels = 4;
    let dial = |p: &Path, uri: &MigrationUri| {
        TlsDialer::new(
            uri.clone(),
            &TlsCreds::load(p).unwrap(),
            None,
            Duration::from_secs(5),
        )
        .unwrap()
    };
    let receive = || {
        let dst = vm(true);
        dst.set_tls_creds(Some(alice.clone())).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let uri = dst
            .incoming("tcp:127.0.0.1:0", move |r| {
                let _ = tx.send(r.map(|i| i.verified).map_err(|e| engine::error_chain(&e)));
            })
            .unwrap();
        (dst, uri, rx)
    };
    // Data channel 1 comes with bob's certificate under alice's session.
    let (dst, uri, done) = receive();
    let r = engine::migrate(
        src.vm().as_ref(),
        &source_identity(&src),
        &params,
        &Impostor {
            main: dial(&alice, &uri),
            other: dial(&bob, &uri),
        },
        src.monitor(),
    );
    assert!(
        r.is_err(),
        "the migration with an impostor channel completed"
    );
    assert!(src.vm().is_running(), "the source's guest stopped");
    let strays = dst
        .query_migrate()
        .multifd
        .map(|m| m.strays)
        .unwrap_or_default();
    assert!(
        strays.iter().any(|s| s
            .contains("data channel 1 presents the identity \"bob\", the main channel \"alice\"")),
        "{strays:?}"
    );
    let _ = done.recv_timeout(Duration::from_secs(60));
    // The same source, all channels as alice, to a fresh destination.
    let (_dst, uri, done) = receive();
    let r = engine::migrate(
        src.vm().as_ref(),
        &source_identity(&src),
        &params,
        &dial(&alice, &uri),
        src.monitor(),
    );
    assert!(r.is_ok(), "{}", engine::error_chain(&r.unwrap_err()));
    let verified = done.recv_timeout(Duration::from_secs(60)).unwrap().unwrap();
    assert!(verified.is_some_and(|v| v.contains("digest")));
}

/// The guest of the capture tests: it keeps dirtying [`CAPTURE_DIRTY`] bytes and has
/// 16 MiB of `--fill` data after them.
const CAPTURE_DIRTY: u64 = 4 << 20;

/// What `--fill` writes at pages 100..164 of the filled range (after the dirtied one):
/// 32 bytes from the start of each page, to look for in a capture.
fn fill_needles() -> Vec<Vec<u8>> {
    let words: Vec<u64> = ferry_vmm::memory::fill_words(CAPTURE_DIRTY)
        .take(512 * 164)
        .collect();
    (100..164)
        .map(|p| {
            words[p * 512..p * 512 + 4]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect()
        })
        .collect()
}

/// Migrates between two namespaces with `tcpdump` capturing the veth in the
/// destination's namespace, and returns how many of [`fill_needles`] the capture holds.
fn capture_migration(link: &Link, dir: &TestDir, name: &str, tls: Option<&Path>) -> usize {
    let mut vm = vec!["--backend", "soft", "--mem", "128M"];
    let dirty = format!("{CAPTURE_DIRTY}");
    let mut src_args = [
        &vm[..],
        &["--dirty", &dirty, "--fill", "16M"],
        &["-global", "migration.verify-full=on"],
    ]
    .concat();
    if let Some(c) = tls {
        vm.extend(["--tls-creds", s(c)]);
        src_args.extend(["--tls-creds", s(c)]);
    }
    let pcap = dir.join(&format!("{name}.pcap"));
    let mut dump = link
        .command(Side::Destination, "tcpdump")
        .args([
            "-i",
            link.interface(Side::Destination),
            "-B",
            "262144",
            "-s",
            "0",
            "-w",
        ])
        .arg(&pcap)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tcpdump");
    // tcpdump says "listening on" once it captures.
    let mut err = dump.stderr.take().unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&seen).contains("listening on") && Instant::now() < deadline {
        let mut b = [0u8; 256];
        match std::io::Read::read(&mut err, &mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&b[..n]),
        }
    }
    // A gigabit link, which tcpdump keeps up with.
    link.rate(1000);
    let dst = link.incoming(dir, &format!("{name}-dst"), &vm);
    let mut src = link.vm(Side::Source, dir, &format!("{name}-src"), &src_args);
    let _ = src.qmp();
    let out = migrate(dir, &src, &dst.uri(), &[]);
    let ctx = format!("{out}{}{}", src.ctx(), dst.ctx());
    assert!(out.status.success(), "{ctx}");
    assert_eq!(out.last_json()["verified"], "digest+full", "{ctx}");
    // Time for tcpdump to write out what it has received.
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: a signal to the child we started.
    unsafe { libc::kill(dump.id() as i32, libc::SIGINT) };
    let _ = std::io::Read::read_to_end(&mut err, &mut seen);
    let _ = dump.wait();
    let said = String::from_utf8_lossy(&seen).to_string();
    // A capture that lost packets could miss pages in the clear: it proves nothing.
    assert!(
        said.lines()
            .any(|l| l.trim() == "0 packets dropped by kernel"),
        "tcpdump lost packets: {said}"
    );
    let cap = std::fs::read(&pcap).expect("the capture");
    assert!(
        cap.len() > 16 << 20,
        "a capture of {} bytes: {said}",
        cap.len()
    );
    fill_needles()
        .iter()
        .filter(|n| cap.windows(n.len()).any(|w| w == &n[..]))
        .count()
}

#[test]
fn a_capture_of_the_link_shows_guest_memory_in_plaintext_and_not_over_tls() {
    let _g = serial();
    if Command::new("tcpdump").arg("--version").output().is_err() {
        println!("skipped: tcpdump is not installed (package tcpdump)");
        return;
    }
    let Some(link) = Link::new_or_skip() else {
        return;
    };
    let dir = TestDir::new("tls-capture");
    let ca = TestCa::new("test CA").unwrap();
    let c = dir.join("creds");
    ca.write_dir(
        &c,
        &TestCredsSpec {
            server_names: vec![common::netns::DST_ADDR.into()],
            client_name: "alice".into(),
            days: 1,
        },
    )
    .unwrap();
    let plain = capture_migration(&link, &dir, "plain", None);
    assert!(
        plain > 0,
        "the plaintext capture holds none of the guest's pages: the check cannot fail"
    );
    let tls = capture_migration(&link, &dir, "tls", Some(&c));
    assert_eq!(
        tls, 0,
        "guest pages in the clear in a TLS migration's capture"
    );
    println!("plaintext capture: {plain} of 64 known pages found; TLS capture: none");
}

/// A `ferry` of release `version` built by the cross-release tests, if one is cached.
fn cached_release(version: &str) -> Option<PathBuf> {
    let cache = std::env::var_os("FERRY_RELEASE_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/ferry-releases"))
        })?;
    std::fs::read_dir(cache).ok()?.flatten().find_map(|e| {
        let bin = e.path().join("ferry");
        let out = Command::new(&bin).arg("--version").output().ok()?;
        (String::from_utf8_lossy(&out.stdout).trim() == format!("ferry {version}")).then_some(bin)
    })
}

/// A release before TLS, either way round: a clear refusal, never a hang.
#[test]
fn a_release_before_tls_is_refused_clearly_both_ways() {
    let _g = serial();
    let Some(old) = cached_release("0.2.0") else {
        println!("skipped: no ferry 0.2.0 in the release cache (the cross-release tests build it)");
        return;
    };
    let dir = TestDir::new("tls-old");
    let ca = TestCa::new("test CA").unwrap();
    let c = creds(&ca, &dir, "creds", "alice", 1);
    let tls = ["--tls-creds", s(&c)];
    // 0.2.0 source, TLS destination: 0.2.0 reads the refusal frame.
    let dst = Vm::incoming(&dir, "dst-new", &[DST, &tls].concat());
    let mut src = Vm::start_program(&old, &dir, "src-old", "ferry 0.2.0 source", SRC);
    let _ = src.qmp();
    let started = Instant::now();
    let out = migrate(&dir, &src, &dst.uri(), &[]);
    assert_refused(
        &out,
        &mut src,
        &dst,
        &["the destination requires TLS (ferry run --tls-creds)"],
    );
    assert!(started.elapsed() < Duration::from_secs(20), "{out}");
    // TLS source, 0.2.0 destination: the source says the destination did not take TLS.
    let mut old_dst = Vm::start_program(
        &old,
        &dir,
        "dst-old",
        "ferry 0.2.0 destination",
        &[DST, &["--incoming", "tcp:127.0.0.1:0"]].concat(),
    );
    let _ = old_dst.qmp();
    let mut src = start(&dir, "src-new", &[SRC, &tls].concat());
    let started = Instant::now();
    let out = migrate(&dir, &src, &old_dst.uri(), &["--tls"]);
    assert_refused(
        &out,
        &mut src,
        &old_dst,
        &[
            "this source requires TLS",
            "closed the connection during the handshake",
        ],
    );
    assert!(started.elapsed() < Duration::from_secs(20), "{out}");
}
