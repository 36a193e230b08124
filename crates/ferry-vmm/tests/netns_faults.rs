//! Migrations across a faulty network: the source and the destination `ferry run` in
//! two network namespaces joined by a veth pair (see [`common::netns`]), with the link
//! slowed (tc tbf), lossy (nftables), delayed and reordered (a relay), or cut, while a
//! soft guest that keeps dirtying its memory migrates over it.
//!
//! Each case ends in one of two ways and the test asserts exactly which:
//! - completed: `ferry migrate` exits 0 with `completed` and `verified: digest+full`
//!   (the source runs with `migration.verify-full=on`), the source is `postmigrate` with
//!   its guest stopped, and the destination's guest runs on past where the source
//!   stopped with every dirtied page intact (`x-ferry-verify`);
//! - failed cleanly, within a bound: `ferry migrate` exits non-zero with `failed`, the
//!   source is `running`, its guest progresses and its memory is intact, and the
//!   destination never ran the guest (it exits non-zero, or waits on without running it).
//!
//! The short cases run in `cargo test`. The longer ones (bigger guests, slower and
//! lossier links, a flapping link) run with `FERRY_NETNS_LONG=1` and print `skipped`
//! otherwise. Every case prints `skipped: ...` and passes where namespaces cannot be made
//! or `tc`/`nft` are missing. Tests run one at a time ([`common::serial`]).

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::netns::{leftover_namespaces, relay_or_skip, Link, RelayOpts, Side, DST_ADDR};
use common::*;
use ferry_vmm::qmp::QmpClient;
use serde_json::Value;

/// The source verifies all of guest memory at the end, on top of the digest.
const VERIFY: &[&str] = &["-global", "migration.verify-full=on"];
/// What a completed migration must report as verified.
const VERIFIED: &str = "digest+full";

/// A guest whose first pass is about 26 MiB of data (2 MiB it keeps dirtying, 24 MiB of
/// incompressible fill) and whose working set converges at 100 Mbit/s: the workload
/// dirties at least ~3200 pages/s, so a pass leaves its whole 2 MiB dirty.
const SMALL: &[&str] = &[
    "--backend",
    "soft",
    "--mem",
    "128M",
    "--dirty",
    "2M",
    "--fill",
    "24M",
];

/// How long a short case's migration may take before the test fails.
const SHORT_BOUND: Duration = Duration::from_secs(60);

/// Whether the long cases run.
fn long_or_skip() -> bool {
    if std::env::var_os("FERRY_NETNS_LONG").is_some_and(|v| v != "0") {
        true
    } else {
        println!("skipped: a long network-fault case; set FERRY_NETNS_LONG=1 to run it");
        false
    }
}

/// A source and a waiting destination across a link. Fields drop in order: the VMs
/// are killed before the temp dir goes, and the namespaces go last.
struct Pair {
    src: Vm,
    s: QmpClient,
    dst: Vm,
    /// The destination's own address, on its end of the link.
    dst_uri: String,
    dir: TestDir,
    link: Link,
}

impl Pair {
    /// Source and destination with `vm` (the source also with [`VERIFY`] and
    /// `src_extra`, the destination with `dst_extra`); the source's guest is already
    /// making progress. `None` when the test is skipped.
    fn start(name: &str, vm: &[&str], src_extra: &[&str], dst_extra: &[&str]) -> Option<Pair> {
        let link = Link::new_or_skip()?;
        let dir = TestDir::new(name);
        let mut src = link.vm(
            Side::Source,
            &dir,
            "source",
            &[vm, VERIFY, src_extra].concat(),
        );
        let dst = link.incoming(
            &dir,
            "destination",
            &[&destination_args(vm), dst_extra].concat(),
        );
        let dst_uri = dst.uri();
        assert!(
            dst_uri.starts_with(&format!("tcp:{DST_ADDR}:")),
            "{dst_uri}{}",
            dst.ctx()
        );
        let mut s = src.qmp();
        assert_eq!(run_state(&mut s), "running", "{}", src.ctx());
        assert_guest_progresses(&mut s, "source");
        Some(Pair {
            src,
            s,
            dst,
            dst_uri,
            dir,
            link,
        })
    }

    /// `ferry migrate --qmp SOURCE URI --json ARGS`, in the background.
    fn migrate(&self, uri: &str, args: &[&str]) -> Running {
        let mut a = vec!["migrate", "--qmp", self.src.qmp_path(), uri, "--json"];
        a.extend(args);
        spawn_ferry(&a)
    }

    fn ctx(&self, out: &Output) -> String {
        format!("{out}{}{}", self.src.ctx(), self.dst.ctx())
    }

    /// Waits until the migration is active and has moved `bytes` of RAM.
    fn wait_ram_moved(&mut self, bytes: u64) -> Value {
        let s = &mut self.s;
        wait_for(
            Duration::from_secs(20),
            || format!("the migration to move {bytes} bytes of RAM"),
            || {
                let q = query_migrate(s);
                let moving = q["status"] == "active"
                    && q["ram"]["transferred"].as_u64().unwrap_or(0) >= bytes;
                moving.then_some(q)
            },
        )
    }

    /// The migration completed, verified, and the guest runs on, intact, at the
    /// destination. Returns the final JSON.
    fn assert_completed(&mut self, out: &Output) -> Value {
        let ctx = self.ctx(out);
        assert!(out.status.success(), "ferry migrate failed\n{ctx}");
        let last = out.last_json();
        assert_eq!(last["status"], "completed", "{ctx}");
        assert_eq!(last["verified"], VERIFIED, "{ctx}");
        assert_eq!(run_state(&mut self.s), "postmigrate", "{ctx}");
        let src_final = passes(&mut self.s);
        let mut d = self.dst.qmp();
        let beyond = wait_passes_beyond(&mut d, &src_final, "destination");
        wait_passes_beyond(&mut d, &beyond, "destination");
        assert_guest_intact(&mut d, "destination");
        assert_eq!(run_state(&mut d), "running", "{}", self.dst.ctx());
        assert_eq!(
            passes(&mut self.s),
            src_final,
            "the source's guest ran after it migrated away{ctx}"
        );
        last
    }

    /// The migration failed, and within `bound` of `started`; the source runs on with
    /// its memory intact, and the destination did not run the guest.
    fn assert_failed_cleanly(&mut self, out: &Output, started: Instant, bound: Duration) {
        let took = started.elapsed();
        let ctx = self.ctx(out);
        assert!(!out.status.success(), "ferry migrate succeeded\n{ctx}");
        assert!(
            took <= bound,
            "the migration took {took:?} to fail, over {bound:?}\n{ctx}"
        );
        let last = out.last_json();
        assert_eq!(last["status"], "failed", "{ctx}");
        assert_eq!(run_state(&mut self.s), "running", "{ctx}");
        assert_guest_progresses(&mut self.s, "source");
        assert_guest_intact(&mut self.s, "source");
        assert_eq!(query_migrate(&mut self.s)["status"], "failed", "{ctx}");
        self.assert_destination_did_not_run(&ctx);
    }

    /// The destination never started the guest: it exited non-zero, or it is alive
    /// and its guest is not running.
    fn assert_destination_did_not_run(&mut self, ctx: &str) {
        let log = self.dst.log();
        assert!(
            !log.contains("migration received"),
            "the destination loaded the guest\n{ctx}"
        );
        if self.dst.alive() {
            let mut d = self.dst.qmp();
            let state = run_state(&mut d);
            assert_ne!(state, "running", "{ctx}");
        } else {
            let st = self.dst.wait_exit(Duration::from_secs(1));
            assert!(
                st.is_some_and(|s| !s.success()),
                "destination: {st:?}\n{ctx}"
            );
        }
    }

    /// Whichever way it ended, it ended as it must (see the module docs). Returns
    /// whether it completed.
    fn assert_completed_or_failed_cleanly(
        &mut self,
        out: &Output,
        started: Instant,
        bound: Duration,
    ) -> bool {
        if out.status.success() {
            self.assert_completed(out);
            true
        } else {
            println!(
                "the migration failed (allowed here): {}",
                out.stdout.lines().last().unwrap_or_default()
            );
            self.assert_failed_cleanly(out, started, bound);
            false
        }
    }
}

/// After the test's links are gone, none of its namespaces is left.
fn assert_no_namespaces_left() {
    let left = leftover_namespaces();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

/// Prints how long the migration took, for the test log.
fn report(name: &str, started: Instant, last: &Value) {
    println!(
        "{name}: {:.1} s, {} passes, {} MiB transferred, downtime {} ms {}",
        started.elapsed().as_secs_f64(),
        last["passes"].as_array().map_or(0, Vec::len),
        last["ram"]["transferred"].as_u64().unwrap_or(0) >> 20,
        last["downtime"],
        last["downtime-breakdown"]
    );
}

/// Four data channels over a 100 Mbit/s link: completes, verified, and every channel
/// carried pages.
#[test]
fn four_channels_over_100mbit() {
    let _one_at_a_time = serial();
    {
        let Some(mut p) = Pair::start("netns-rate", SMALL, &[], &[]) else {
            return;
        };
        p.link.rate(100);
        let started = Instant::now();
        let out = p
            .migrate(&p.dst_uri, &["--channels", "4"])
            .finish(SHORT_BOUND);
        let last = p.assert_completed(&out);
        let ctx = p.ctx(&out);
        let m = &last["multifd"];
        assert_eq!(m["channels"], 4, "{ctx}");
        let per = m["per-channel"].as_array().expect("per-channel figures");
        assert_eq!(per.len(), 4, "{ctx}");
        assert!(
            per.iter().all(|c| c["pages"].as_u64() > Some(0)),
            "a channel carried no pages: {ctx}"
        );
        // 26 MiB cannot cross 100 Mbit/s in under ~2 s: the cap was in the path.
        assert!(
            started.elapsed() > Duration::from_millis(1500),
            "{:?}: faster than the link\n{ctx}",
            started.elapsed()
        );
        report("100 Mbit/s, 4 channels", started, &last);
    }
    assert_no_namespaces_left();
}

/// 5 % of the packets lost, each way: TCP recovers and the migration completes,
/// verified.
#[test]
fn five_percent_loss() {
    let _one_at_a_time = serial();
    {
        let Some(mut p) = Pair::start("netns-loss", SMALL, &[], &[]) else {
            return;
        };
        p.link.rate(100);
        p.link.loss(5);
        let started = Instant::now();
        let out = p
            .migrate(&p.dst_uri, &["--channels", "2"])
            .finish(SHORT_BOUND);
        let last = p.assert_completed(&out);
        report("5 % loss", started, &last);
    }
    assert_no_namespaces_left();
}

/// 30 ms each way (plus up to 10 ms of jitter, which reorders chunks across the
/// connections) through the relay, 2 data channels: completes, verified.
#[test]
fn delayed_link_two_channels() {
    if !relay_or_skip() {
        return;
    }
    let _one_at_a_time = serial();
    {
        let Some(mut p) = Pair::start("netns-delay", SMALL, &[], &[]) else {
            return;
        };
        let relay = p.link.relay(
            p.dst_uri.strip_prefix("tcp:").unwrap(),
            &RelayOpts {
                delay_ms: 30,
                jitter_ms: 10,
                ..RelayOpts::default()
            },
        );
        let started = Instant::now();
        let out = p
            .migrate(&relay.uri(), &["--channels", "2"])
            .finish(SHORT_BOUND);
        let last = p.assert_completed(&out);
        report("30 ms delay, 2 channels", started, &last);
    }
    assert_no_namespaces_left();
}

/// One data channel held 200 ms behind the main channel and the other data channel:
/// pages it carries land after pages of later passes on the other channel. With
/// either sync rule (once per pass, the default; after every section, 0.1's), no stale
/// page wins: completes, verified.
fn one_channel_behind(name: &str, extra: &[&str]) {
    if !relay_or_skip() {
        return;
    }
    let _one_at_a_time = serial();
    {
        let Some(mut p) = Pair::start(name, SMALL, extra, extra) else {
            return;
        };
        let relay = p.link.relay(
            p.dst_uri.strip_prefix("tcp:").unwrap(),
            &RelayOpts {
                delay_ms: 2,
                jitter_ms: 20,
                slow: vec![(1, 200)],
                seed: 7,
            },
        );
        let started = Instant::now();
        let out = p
            .migrate(&relay.uri(), &["--channels", "2"])
            .finish(SHORT_BOUND);
        let last = p.assert_completed(&out);
        report(name, started, &last);
    }
    assert_no_namespaces_left();
}

#[test]
fn one_data_channel_behind_the_others() {
    one_channel_behind("netns-behind", &[]);
}

#[test]
fn one_data_channel_behind_with_flush_after_each_section() {
    one_channel_behind(
        "netns-behind-flush",
        &["-global", "migration.multifd-flush-after-each-section=on"],
    );
}

/// The link goes down for 2 s mid-migration and comes back: TCP retransmits and the
/// migration completes, verified; or it fails, with the source running and intact.
#[test]
fn link_down_two_seconds_mid_migration() {
    let _one_at_a_time = serial();
    {
        let vm = &[
            "--backend",
            "soft",
            "--mem",
            "128M",
            "--dirty",
            "2M",
            "--fill",
            "32M",
        ];
        let Some(mut p) = Pair::start("netns-blip", vm, &[], &[]) else {
            return;
        };
        p.link.rate(100);
        let started = Instant::now();
        let mig = p.migrate(&p.dst_uri, &["--channels", "2"]);
        p.wait_ram_moved(4 << 20);
        p.link.down();
        thread::sleep(Duration::from_secs(2));
        p.link.up();
        let out = mig.finish(SHORT_BOUND);
        let done = p.assert_completed_or_failed_cleanly(&out, started, SHORT_BOUND);
        println!(
            "link down 2 s: {} in {:.1} s",
            if done { "completed" } else { "failed" },
            started.elapsed().as_secs_f64()
        );
    }
    assert_no_namespaces_left();
}

/// A destination's arguments: the source's, but for `--fill` and `--dirty-rate` (its
/// memory and workload come from the source, and `ferry run --incoming` refuses them).
fn destination_args<'a>(vm: &[&'a str]) -> Vec<&'a str> {
    let mut out = Vec::with_capacity(vm.len());
    let mut it = vm.iter();
    while let Some(&a) = it.next() {
        if a == "--fill" || a == "--dirty-rate" {
            it.next();
        } else {
            out.push(a);
        }
    }
    out
}

/// How long either side may wait on a silent peer, in these tests.
const LIVENESS_MS: &str = "3000";

/// The link goes down for good mid-migration. With `migration.liveness-timeout` at 3 s
/// on both sides the migration must fail within 15 s (the limit, the socket buffers
/// filling first, and TCP_USER_TIMEOUT at twice the limit), the source's guest running
/// and intact, the destination giving up without running the guest; and once the link
/// is back, a migration to a fresh destination succeeds.
#[test]
fn link_down_for_good_mid_migration() {
    let _one_at_a_time = serial();
    {
        let liveness = format!("migration.liveness-timeout={LIVENESS_MS}");
        let extra = ["-global", liveness.as_str()];
        let vm = &[
            "--backend",
            "soft",
            "--mem",
            "128M",
            "--dirty",
            "2M",
            "--fill",
            "32M",
        ];
        let Some(mut p) = Pair::start("netns-cut", vm, &extra, &extra) else {
            return;
        };
        p.link.rate(100);
        let bound = Duration::from_secs(15);
        let mig = p.migrate(&p.dst_uri, &["--channels", "2"]);
        p.wait_ram_moved(4 << 20);
        p.link.down();
        let cut = Instant::now();
        let out = mig.finish(bound + Duration::from_secs(10));
        p.assert_failed_cleanly(&out, cut, bound);
        // A true message: the peer went silent (or the kernel gave up on the link),
        // with the time waited, never "0 s".
        let why = out.last_json()["error-desc"].to_string();
        assert!(
            why.contains("went silent")
                && (why.contains("nothing came") || why.contains("kernel dropped")),
            "{why}"
        );
        println!(
            "link cut: the source gave up after {:.1} s",
            cut.elapsed().as_secs_f64()
        );
        // The destination gives up on its own too, without having run the guest.
        let st = p.dst.wait_exit(bound.saturating_sub(cut.elapsed()));
        let ctx = p.ctx(&out);
        assert!(
            st.is_some_and(|s| !s.success()),
            "destination: {st:?} {:.1} s after the cut (want a non-zero exit)\n{ctx}",
            cut.elapsed().as_secs_f64()
        );
        p.assert_destination_did_not_run(&ctx);

        // The source can migrate again once the network is back.
        p.link.up();
        let mut dst2 = p.link.incoming(
            &p.dir,
            "destination2",
            &[&destination_args(vm), &extra[..]].concat(),
        );
        let uri2 = dst2.uri();
        std::mem::swap(&mut p.dst, &mut dst2);
        let out = p.migrate(&uri2, &["--channels", "2"]).finish(SHORT_BOUND);
        p.assert_completed(&out);
    }
    assert_no_namespaces_left();
}

// ---- Long cases: FERRY_NETNS_LONG=1 ----

/// How long a long case's migration may take before the test fails.
const LONG_BOUND: Duration = Duration::from_secs(300);

/// A 512 MiB guest with 96 MiB of data over 20 Mbit/s and 4 channels.
#[test]
fn long_big_guest_over_20mbit() {
    if !long_or_skip() {
        return;
    }
    let _one_at_a_time = serial();
    {
        let vm = &[
            "--backend",
            "soft",
            "--mem",
            "512M",
            "--dirty",
            "2M",
            "--fill",
            "96M",
        ];
        let Some(mut p) = Pair::start("netns-long-slow", vm, &[], &[]) else {
            return;
        };
        p.link.rate(20);
        let started = Instant::now();
        let out = p
            .migrate(&p.dst_uri, &["--channels", "4", "--downtime-limit", "2000"])
            .finish(LONG_BOUND);
        if p.assert_completed_or_failed_cleanly(&out, started, LONG_BOUND) {
            report("512 MiB over 20 Mbit/s", started, &out.last_json());
        }
    }
    assert_no_namespaces_left();
}

/// 12 % loss each way on a 100 Mbit/s link, 256 MiB guest.
#[test]
fn long_heavy_loss() {
    if !long_or_skip() {
        return;
    }
    let _one_at_a_time = serial();
    {
        let vm = &[
            "--backend",
            "soft",
            "--mem",
            "256M",
            "--dirty",
            "2M",
            "--fill",
            "48M",
        ];
        let Some(mut p) = Pair::start("netns-long-loss", vm, &[], &[]) else {
            return;
        };
        p.link.rate(100);
        p.link.loss(12);
        let started = Instant::now();
        let out = p
            .migrate(&p.dst_uri, &["--channels", "4", "--downtime-limit", "2000"])
            .finish(LONG_BOUND);
        if p.assert_completed_or_failed_cleanly(&out, started, LONG_BOUND) {
            report("12 % loss", started, &out.last_json());
        }
    }
    assert_no_namespaces_left();
}

/// A 20 Mbit/s link that goes down for 1.5 s five times during the migration.
#[test]
fn long_flapping_link() {
    if !long_or_skip() {
        return;
    }
    let _one_at_a_time = serial();
    {
        let vm = &[
            "--backend",
            "soft",
            "--mem",
            "256M",
            "--dirty",
            "2M",
            "--fill",
            "48M",
        ];
        let Some(mut p) = Pair::start("netns-long-flap", vm, &[], &[]) else {
            return;
        };
        p.link.rate(20);
        let started = Instant::now();
        let mig = p.migrate(&p.dst_uri, &["--channels", "4", "--downtime-limit", "2000"]);
        p.wait_ram_moved(2 << 20);
        for _ in 0..5 {
            p.link.down();
            thread::sleep(Duration::from_millis(1500));
            p.link.up();
            thread::sleep(Duration::from_millis(2500));
        }
        let out = mig.finish(LONG_BOUND);
        let done = p.assert_completed_or_failed_cleanly(&out, started, LONG_BOUND);
        println!(
            "flapping link: {} in {:.1} s",
            if done { "completed" } else { "failed" },
            started.elapsed().as_secs_f64()
        );
    }
    assert_no_namespaces_left();
}

/// Everything at once: 50 Mbit/s, 3 % loss, 60 ms delay with 40 ms of jitter, one data
/// channel 300 ms behind, 4 channels.
#[test]
fn long_delay_loss_and_reordering() {
    if !long_or_skip() || !relay_or_skip() {
        return;
    }
    let _one_at_a_time = serial();
    {
        let vm = &[
            "--backend",
            "soft",
            "--mem",
            "256M",
            "--dirty",
            "2M",
            "--fill",
            "48M",
        ];
        let Some(mut p) = Pair::start("netns-long-mix", vm, &[], &[]) else {
            return;
        };
        p.link.rate(50);
        p.link.loss(3);
        let relay = p.link.relay(
            p.dst_uri.strip_prefix("tcp:").unwrap(),
            &RelayOpts {
                delay_ms: 60,
                jitter_ms: 40,
                slow: vec![(2, 300)],
                seed: 11,
            },
        );
        let started = Instant::now();
        let out = p
            .migrate(
                &relay.uri(),
                &["--channels", "4", "--downtime-limit", "2000"],
            )
            .finish(LONG_BOUND);
        if p.assert_completed_or_failed_cleanly(&out, started, LONG_BOUND) {
            report("delay, loss and reordering", started, &out.last_json());
        }
    }
    assert_no_namespaces_left();
}

/// The link cut for good with the defaults (no liveness timeout set): the migration
/// must still fail in bounded time, the source running and intact, and the destination
/// must give up without running the guest. On `ferry-0.3` the default
/// `migration.liveness-timeout` is 5 s; before it, the source failed about 183 s after
/// the cut, saying it had waited "0 s". The bound leaves room for a loaded machine.
#[test]
fn long_link_down_for_good_default_timeouts() {
    if !long_or_skip() {
        return;
    }
    let _one_at_a_time = serial();
    {
        let vm = &[
            "--backend",
            "soft",
            "--mem",
            "128M",
            "--dirty",
            "2M",
            "--fill",
            "32M",
        ];
        let Some(mut p) = Pair::start("netns-long-cut", vm, &[], &[]) else {
            return;
        };
        p.link.rate(100);
        let mig = p.migrate(&p.dst_uri, &["--channels", "2"]);
        p.wait_ram_moved(4 << 20);
        p.link.down();
        let cut = Instant::now();
        let bound = Duration::from_secs(30);
        let out = mig.finish(bound + Duration::from_secs(10));
        p.assert_failed_cleanly(&out, cut, bound);
        println!(
            "link cut, default timeouts: the source gave up after {:.1} s",
            cut.elapsed().as_secs_f64()
        );
        let st = p.dst.wait_exit(bound.saturating_sub(cut.elapsed()));
        let ctx = p.ctx(&out);
        assert!(
            st.is_some_and(|s| !s.success()),
            "destination: {st:?} {:.1} s after the cut (want a non-zero exit)\n{ctx}",
            cut.elapsed().as_secs_f64()
        );
        println!(
            "link cut, default timeouts: the destination gave up by {:.1} s",
            cut.elapsed().as_secs_f64()
        );
        p.assert_destination_did_not_run(&ctx);
    }
    assert_no_namespaces_left();
}

// ---- Convergence under pressure: a guest that outruns a 100 Mbit/s link ----

/// A guest that rewrites 32 MiB at 100 MiB/s: each pass over a 100 Mbit/s link (~2.7 s)
/// finds all of it dirty again, so on its own the migration never converges.
const OUTRUNS: &[&str] = &[
    "--backend",
    "soft",
    "--mem",
    "128M",
    "--dirty",
    "32M",
    "--dirty-rate",
    "25600",
];

/// Without help, the migration says it is not converging, with the figures, and the
/// timeout cancels it: the source runs on, intact, and the destination never ran.
#[test]
fn a_guest_that_outruns_the_link_is_cancelled_at_the_timeout_with_the_figures() {
    let _one_at_a_time = serial();
    {
        let timeout = ["-global", "migration.x-ferry-timeout=15"];
        let Some(mut p) = Pair::start("netns-stall", OUTRUNS, &timeout, &[]) else {
            return;
        };
        p.link.rate(100);
        let started = Instant::now();
        let mig = p.migrate(&p.dst_uri, &["--channels", "2"]);
        // While it runs, query-migrate says why it does not converge.
        let why = {
            let s = &mut p.s;
            wait_for(
                Duration::from_secs(30),
                || "query-migrate to say the migration is not converging".into(),
                || {
                    let q = query_migrate(s);
                    q["convergence"]["why"].as_str().map(str::to_string)
                },
            )
        };
        assert!(
            why.contains("guest dirties") && why.contains("at this rate the switchover needs"),
            "{why}"
        );
        let out = mig.finish(Duration::from_secs(60));
        p.assert_failed_cleanly(&out, started, Duration::from_secs(40));
        let e = out.last_json()["error-desc"].to_string();
        assert!(
            e.contains("did not converge within its timeout of 15 s"),
            "{e}"
        );
        println!(
            "stall: {why}\n  ended after {:.1} s: {e}",
            started.elapsed().as_secs_f64()
        );
    }
    assert_no_namespaces_left();
}

/// The same guest with a throttle: the migration converges, memory verified. `extra`
/// turns the throttle on; returns the final JSON.
fn outrun_with(name: &str, extra: &[&str]) -> Option<Value> {
    let mut p = Pair::start(name, OUTRUNS, extra, &[])?;
    p.link.rate(100);
    let started = Instant::now();
    let out = p
        .migrate(&p.dst_uri, &["--channels", "2"])
        .finish(Duration::from_secs(120));
    let last = p.assert_completed(&out);
    report(name, started, &last);
    Some(last)
}

/// Auto-converge (a steep schedule, so the test is short): the source throttles every
/// vCPU until the guest's dirtying fits the link, and the migration completes.
#[test]
fn auto_converge_brings_a_guest_that_outruns_the_link_home() {
    let _one_at_a_time = serial();
    if let Some(last) = outrun_with(
        "netns-autoconverge",
        &[
            "-global",
            "migration.auto-converge=on",
            "-global",
            "migration.cpu-throttle-initial=80",
            "-global",
            "migration.cpu-throttle-increment=19",
        ],
    ) {
        let peak = last["passes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["cpu-throttle-percent"].as_u64())
            .max()
            .unwrap_or(0);
        assert!(peak >= 80, "the throttle never stepped: {last}");
        assert!(
            last["cpu-throttle-percentage"].as_u64().unwrap_or(0) >= 80,
            "{last}"
        );
    }
    assert_no_namespaces_left();
}

/// Dirty-limit: only the vCPU that writes is slowed, to 2 MB/s, and the migration
/// completes.
#[test]
fn dirty_limit_brings_a_guest_that_outruns_the_link_home() {
    let _one_at_a_time = serial();
    if let Some(last) = outrun_with(
        "netns-dirtylimit",
        &[
            "-global",
            "migration.dirty-limit=on",
            "-global",
            "migration.vcpu-dirty-limit=2",
        ],
    ) {
        assert!(
            last["passes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["dirty-limited"] == true),
            "the dirty limit never came on: {last}"
        );
        assert!(
            last["dirty-limit-throttle-time-per-round"].is_u64(),
            "{last}"
        );
    }
    assert_no_namespaces_left();
}
