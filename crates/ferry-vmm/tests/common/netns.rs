//! Two hosts on one machine, for network-fault tests: a source and a destination
//! `ferry run` each in a network namespace of its own, joined by a veth pair, with the
//! link between them slowed, made lossy, delayed or cut while a migration crosses it.
//!
//! # Design
//!
//! A [`Link`] makes two namespaces, `ferry-t<pid>-<n>s` and `ferry-t<pid>-<n>d` (the test
//! process's pid and a counter, so parallel tests and parallel test binaries never
//! collide), and a veth pair created directly inside them (`ip link add ... netns A type
//! veth peer ... netns B`), so no interface ever appears in the host's namespace. The
//! ends get [`SRC_ADDR`] and [`DST_ADDR`] on a /24 and come up with `lo`; every namespace
//! pair is its own network, so every link can use the same addresses. Dropping the
//! `Link` kills what still runs inside its namespaces and deletes them, which deletes
//! the veth pair with them; nothing the harness does touches the host's own interfaces,
//! routes or rules. Namespaces left by a test binary that was itself killed (its pid is
//! gone) are removed the next time a `Link` is made.
//!
//! The faults, and why each is made the way it is:
//! - Bandwidth ([`Link::rate`]): a `tc tbf` qdisc on both veth ends' egress, so the
//!   pages and the return path both cross a link of that rate.
//! - Loss ([`Link::loss`]): an nftables rule `numgen random mod 100 < P drop` in each
//!   namespace's *input* hook, for packets arriving on the veth. Dropping on arrival
//!   rather than in the sender's output hook keeps the sender's stack from seeing the
//!   drop as a local transmit error: to TCP it is a packet lost on the wire, in both
//!   directions (data and ACKs). Loopback (a relay's traffic) is not affected.
//! - Cut ([`Link::down`] / [`Link::up`]): `ip link set ... down` on both ends. The
//!   connected route goes with it, so retransmissions fail until `up`; established
//!   connections survive a short cut by TCP's own retransmission.
//! - Delay and reordering ([`Link::relay`]): this kernel has no `sch_netem`, so
//!   `tc qdisc ... netem delay` is not available. Instead `tests/tools/relay.py` runs in
//!   the source's namespace, listens on its loopback and forwards every accepted
//!   connection over the veth to the destination, holding each chunk for a fixed
//!   delay plus an optional random jitter. TCP cannot reorder bytes within a stream, so
//!   what "reordering" means here is across connections: with jitter, chunks of
//!   different connections overtake each other, and one connection can be held further
//!   behind the rest (`--slow INDEX:MS`; with ferry, connection 0 is the main channel,
//!   1.. the data channels), so one data channel's pages land after what later passes
//!   sent on the others, which is what multifd's sync must make harmless. The relay is
//!   killed when its [`Relay`] is dropped and exits on its own when the test process's
//!   end closes its stdin.
//!
//! # Skipping
//!
//! [`Link::new_or_skip`] prints `skipped: ...` and returns `None` (the test then returns
//! and passes, as `kvm_or_skip` does for KVM) when `ip`, `tc` or `nft` is not installed
//! or when namespaces cannot be made (not root, or no `CAP_SYS_ADMIN` in a container).
//! A test that needs the relay also calls [`relay_or_skip`] (python3).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;

use super::{kill_and_reap, TestDir, Vm, FERRY, START_TIMEOUT};

/// The source end of the veth pair.
pub const SRC_ADDR: &str = "10.99.0.1";
/// The destination end of the veth pair.
pub const DST_ADDR: &str = "10.99.0.2";

/// Prefix of every namespace this harness makes.
const PREFIX: &str = "ferry-t";
/// The nftables table the loss rule lives in (inside the test's namespaces only).
const NFT_TABLE: &str = "ferry_faults";
/// The relay script.
pub const RELAY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/relay.py");

/// Which end of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// Runs `program args`; Err carries what it printed.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("`{program} {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` exited with {}: {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Runs a command that must succeed.
fn must(program: &str, args: &[&str]) -> String {
    run(program, args).unwrap_or_else(|e| panic!("{e}"))
}

/// Whether `program` can be run at all (`program arg` exits, whatever its status).
fn installed(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Whether the relay can run; prints why not when it cannot.
pub fn relay_or_skip() -> bool {
    if installed("python3", "--version") {
        true
    } else {
        println!(
            "skipped: python3 is not installed; the delay relay (tests/tools/relay.py) needs it"
        );
        false
    }
}

/// The pids of the processes in namespace `ns`.
fn pids_in(ns: &str) -> Vec<u32> {
    run("ip", &["netns", "pids", ns])
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILLs what runs in `ns` (only processes of ours: nothing else enters these
/// namespaces) and deletes it.
fn remove_ns(ns: &str) {
    for pid in pids_in(ns) {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: kill(2) takes no pointers; `pid` runs in a namespace this harness
            // made for one test, so it is a process that test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = run("ip", &["netns", "del", ns]);
}

/// Removes namespaces of this harness whose test process is gone (it was killed before
/// its `Link`s were dropped).
fn sweep_stale() {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = ns
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            remove_ns(ns);
        }
    }
}

/// Two namespaces joined by a veth pair; removed, with everything in them, on drop.
pub struct Link {
    src_ns: String,
    dst_ns: String,
    src_if: String,
    dst_if: String,
}

impl Link {
    /// A fresh link, or `None` after printing `skipped: WHY` when this machine cannot
    /// make one.
    pub fn new_or_skip() -> Option<Link> {
        for (tool, arg, package) in [
            ("ip", "-V", "iproute2"),
            ("tc", "-V", "iproute2"),
            ("nft", "--version", "nftables"),
        ] {
            if !installed(tool, arg) {
                println!("skipped: `{tool}` is not installed (package {package}); the network-fault tests need it");
                return None;
            }
        }
        match Link::new() {
            Ok(l) => Some(l),
            Err(e) => {
                println!("skipped: cannot make network namespaces here (root and CAP_SYS_ADMIN are needed): {e}");
                None
            }
        }
    }

    /// A fresh link; Err if any step fails (what was made is removed).
    pub fn new() -> Result<Link, String> {
        static N: AtomicUsize = AtomicUsize::new(0);
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(sweep_stale);
        let pid = std::process::id();
        let n = N.fetch_add(1, Ordering::Relaxed);
        // Interface names are at most 15 bytes: "fs" + pid (up to 7 digits) + "x" + n.
        let link = Link {
            src_ns: format!("{PREFIX}{pid}-{n}s"),
            dst_ns: format!("{PREFIX}{pid}-{n}d"),
            src_if: format!("fs{pid}x{}", n % 100_000),
            dst_if: format!("fd{pid}x{}", n % 100_000),
        };
        // From here on, Drop removes whatever was made.
        run("ip", &["netns", "add", &link.src_ns])?;
        run("ip", &["netns", "add", &link.dst_ns])?;
        run(
            "ip",
            &[
                "link",
                "add",
                &link.src_if,
                "netns",
                &link.src_ns,
                "type",
                "veth",
                "peer",
                "name",
                &link.dst_if,
                "netns",
                &link.dst_ns,
            ],
        )?;
        for (ns, ifname, addr) in [
            (&link.src_ns, &link.src_if, SRC_ADDR),
            (&link.dst_ns, &link.dst_if, DST_ADDR),
        ] {
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    ifname,
                ],
            )?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            run("ip", &["-n", ns, "link", "set", ifname, "up"])?;
        }
        Ok(link)
    }

    pub fn ns(&self, side: Side) -> &str {
        match side {
            Side::Source => &self.src_ns,
            Side::Destination => &self.dst_ns,
        }
    }

    /// The veth end in `side`'s namespace (for a capture there).
    pub fn interface(&self, side: Side) -> &str {
        match side {
            Side::Source => &self.src_if,
            Side::Destination => &self.dst_if,
        }
    }

    fn ends(&self) -> [(&str, &str); 2] {
        [(&self.src_ns, &self.src_if), (&self.dst_ns, &self.dst_if)]
    }

    /// `ip netns exec NS program`: a command that runs inside `side`'s namespace.
    pub fn command(&self, side: Side, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns(side)]).arg(program);
        c
    }

    /// Caps both directions of the link at `mbit` Mbit/s (tc tbf on each end).
    pub fn rate(&self, mbit: u32) {
        // A burst of at least 10 ms at the rate (a 1000 Hz clock must be able to refill
        // it), and never under the 32 kbit that tbf needs for a full-size frame.
        let burst = format!("{}kbit", (mbit * 10).max(32));
        let rate = format!("{mbit}mbit");
        for (ns, ifname) in self.ends() {
            must(
                "ip",
                &[
                    "netns", "exec", ns, "tc", "qdisc", "replace", "dev", ifname, "root", "tbf",
                    "rate", &rate, "burst", &burst, "latency", "400ms",
                ],
            );
        }
    }

    /// Drops `percent` % of the packets arriving on either end, at random (nftables);
    /// 0 removes the rule.
    pub fn loss(&self, percent: u32) {
        for (ns, ifname) in self.ends() {
            let nft = |args: &[&str]| {
                let mut a = vec!["netns", "exec", ns, "nft"];
                a.extend(args);
                must("ip", &a)
            };
            let _ = run(
                "ip",
                &[
                    "netns", "exec", ns, "nft", "delete", "table", "inet", NFT_TABLE,
                ],
            );
            if percent == 0 {
                continue;
            }
            nft(&["add", "table", "inet", NFT_TABLE]);
            nft(&[
                "add",
                "chain",
                "inet",
                NFT_TABLE,
                "in",
                "{ type filter hook input priority 0; }",
            ]);
            nft(&[
                "add",
                "rule",
                "inet",
                NFT_TABLE,
                "in",
                "iifname",
                ifname,
                "numgen",
                "random",
                "mod",
                "100",
                "<",
                &percent.to_string(),
                "drop",
            ]);
        }
    }

    /// Cuts the link: both ends down.
    pub fn down(&self) {
        for (ns, ifname) in self.ends() {
            must("ip", &["-n", ns, "link", "set", ifname, "down"]);
        }
    }

    /// Restores a cut link.
    pub fn up(&self) {
        for (ns, ifname) in self.ends() {
            must("ip", &["-n", ns, "link", "set", ifname, "up"]);
        }
    }

    /// `ferry run ARGS --qmp <dir>/<name>.sock` inside `side`'s namespace; the QMP socket
    /// is a path in the test's directory, so the test reaches it from outside.
    pub fn vm(&self, side: Side, dir: &TestDir, name: &str, args: &[&str]) -> Vm {
        let qmp = dir.join(&format!("{name}.sock"));
        let log = dir.join(&format!("{name}.log"));
        let err = std::fs::File::create(&log).expect("create a VM log");
        // `ip netns exec` execs ferry itself, so the child's pid is ferry's.
        let mut child = self
            .command(side, FERRY)
            .arg("run")
            .args(args)
            .arg("--qmp")
            .arg(&qmp)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("start ferry run in a namespace");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, stdout) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Vm {
            name: format!("{name} (in {})", self.ns(side)),
            child,
            qmp,
            log,
            stdout,
        }
    }

    /// A destination waiting on the destination end: `--incoming tcp:DST_ADDR:0`.
    pub fn incoming(&self, dir: &TestDir, name: &str, args: &[&str]) -> Vm {
        let incoming = format!("tcp:{DST_ADDR}:0");
        let mut a = args.to_vec();
        a.extend(["--incoming", &incoming]);
        self.vm(Side::Destination, dir, name, &a)
    }

    /// Starts the delay relay in the source's namespace, listening on its loopback and
    /// forwarding to `to` (an address on the destination end) over the link.
    pub fn relay(&self, to: &str, opts: &RelayOpts) -> Relay {
        let mut c = self.command(Side::Source, "python3");
        c.arg(RELAY)
            .args(["--listen", "127.0.0.1:0", "--to", to])
            .args(["--delay", &opts.delay_ms.to_string()])
            .args(["--jitter", &opts.jitter_ms.to_string()])
            .args(["--seed", &opts.seed.to_string()]);
        for (i, ms) in &opts.slow {
            c.args(["--slow", &format!("{i}:{ms}")]);
        }
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the relay");
        let stdin = child.stdin.take();
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            // Keep reading so the relay never blocks on a full pipe.
            for _ in lines {}
        });
        let mut relay = Relay {
            child,
            _stdin: stdin,
            addr: String::new(),
        };
        let line = rx
            .recv_timeout(START_TIMEOUT)
            .unwrap_or_else(|e| panic!("the relay did not say where it listens: {e}"));
        let addr = line
            .strip_prefix("relay listening on ")
            .unwrap_or_else(|| panic!("unexpected line from the relay: {line:?}"));
        relay.addr = addr.trim().to_string();
        relay
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and with it the other end.
        remove_ns(&self.src_ns);
        remove_ns(&self.dst_ns);
    }
}

/// What the relay does to what it forwards.
#[derive(Debug, Clone, Default)]
pub struct RelayOpts {
    /// Every chunk, each direction.
    pub delay_ms: u32,
    /// A random 0..jitter on top, per chunk; reorders chunks across connections.
    pub jitter_ms: u32,
    /// (connection index, extra ms): that connection held further behind.
    pub slow: Vec<(u32, u32)>,
    pub seed: u64,
}

/// A running relay; killed when dropped.
pub struct Relay {
    child: Child,
    _stdin: Option<ChildStdin>,
    addr: String,
}

impl Relay {
    /// `tcp:127.0.0.1:PORT`, for `ferry migrate` (the source runs in the relay's
    /// namespace).
    pub fn uri(&self) -> String {
        format!("tcp:{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.parse().expect("host:port")
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// The namespaces this process made that still exist (for a test's final check).
pub fn leftover_namespaces() -> Vec<String> {
    let mine = format!("{PREFIX}{}-", std::process::id());
    run("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&mine))
        .map(str::to_string)
        .collect()
}
