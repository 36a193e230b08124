//! Live migration between this build and every recorded release, with the real
//! binaries.
//!
//! `compat_releases.rs` holds this build to the *schemas* each release shipped (its
//! golden dump); it cannot see the stream's framing, the handover, the data channels'
//! packets, the device plan or what a device does with its state (RELEASING.md, "What
//! the check does not see"). This file checks the promise itself, for each release R in
//! `compat/releases.toml`: a running guest migrates from R's `ferry run` to this build's
//! and back, two processes talking over loopback TCP, driven as a user would with the
//! `ferry migrate` of the source's release.
//!
//! Cells, for each release R, on R's newest machine type (`ferry-0.1` for 0.1.0), both
//! ways: the main channel only and 1, 2 and 4 data channels; and on KVM an accelerator
//! of 64 MiB on both sides with 0 and 4 channels, with this build's host able to precopy
//! it and not (R's too, where R has the switch). Then this build's newest machine type
//! (`ferry-0.2`) against R: where R lacks it, this build's guest is refused before any RAM
//! moves, naming the machine type, and runs on; R cannot start a guest on it at all. Where
//! R has it, the cells above run on it too.
//!
//! Guests run on KVM (`--mem 256M --dirty 16M`) when it is usable, else on the soft
//! backend, and the test says which. After every completed hop: `ferry migrate` exited
//! 0 with `completed`, `verified` is `digest` or `digest+full`, the pages travelled as
//! asked, the source is `postmigrate` with its guest frozen, the destination runs the
//! guest past where the source stopped and `x-ferry-verify` finds no wrong page, an
//! accelerator's memory arrived with the digest the source saved, a source of this
//! build says how the accelerator moved (precopy only where the machine type and both
//! hosts allow it), and both processes leave on `quit`. Every cell runs even when an
//! earlier one fails; the test fails at the end naming each failed cell ("0.1.0 ->
//! current, 4 channels: ...").
//!
//! # A release's binary
//!
//! It is built from the commit `compat/releases.toml` records for it, not from a tag
//! or a downloaded artifact: the record is what the release promise is checked against
//! everywhere else, and a commit in the repository's own history is there without a
//! network. The tree of that commit is taken with `git archive` (the clone's work tree
//! and index are not touched) into
//! `${FERRY_RELEASE_CACHE:-$HOME/.cache/ferry-releases}/<commit>/src`, outside the
//! clone, and built there with `cargo build --locked --bin ferry` (debug profile) and
//! `CARGO_TARGET_DIR=<cache>/<commit>/target`. The binary is copied to
//! `<cache>/<commit>/ferry`, the source tree and target directory are removed, and
//! cargo's output stays in `<cache>/<commit>/build.log`. Once that binary exists it is
//! used as it is; delete `<cache>/<commit>` to rebuild. The build holds
//! `<cache>/<commit>/build.lock` (flock), so test processes started at once build it
//! once. A cold build takes a minute or two on 2 cores (more if crates must be
//! downloaded); with the cache warm the whole file takes about ten seconds. Before it is
//! used, the binary must say it is 0.1.0 and dump exactly the release's golden dump, so
//! a wrong build cannot pass for the release.
//!
//! Without git, or in a clone that lacks the commit (a shallow clone), the test prints
//! `skipped: ...` and passes. A failed build fails it, with the tail of cargo's output.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{
    assert_guest_intact, assert_guest_progresses, error_chain, exec, passes, query_migrate,
    run_state, serial, wait_passes_beyond, Output, TestDir, Vm, FERRY, MIGRATE_TIMEOUT,
};
use serde::Deserialize;
use serde_json::Value;

/// How long a cold `cargo build` of the release may take (a few minutes on 2 cores).
const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// How long another process's build may hold the lock: as long as its build may take.
const LOCK_TIMEOUT: Duration = BUILD_TIMEOUT;
/// `git`, `tar`, `ferry --help` and other one-shot commands.
const QUICK: Duration = Duration::from_secs(60);
/// How long a VM may take to leave after `quit`.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The guest every cell migrates, on either backend.
const GUEST: &[&str] = &["--mem", "256M", "--dirty", "16M"];
/// The accelerator of the accelerator cells, on both sides.
const ACCEL: &str = "64M";
/// The data channels of the plain cells.
const CHANNELS: [u16; 4] = [0, 1, 2, 4];
/// The data channels of the accelerator cells.
const ACCEL_CHANNELS: [u16; 2] = [0, 4];

/// `compat/releases.toml`; see `compat_releases.rs`, which checks its shape strictly.
#[derive(Debug, Deserialize)]
struct Record {
    #[serde(default)]
    release: Vec<Release>,
}

/// The fields of a `[[release]]` this file uses.
#[derive(Debug, Clone, Deserialize)]
struct Release {
    version: String,
    machine: String,
    commit: String,
    dump: String,
}

/// The repository's top directory.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository's top directory")
}

/// Every recorded release, oldest first.
fn read_releases(repo: &Path) -> Vec<Release> {
    let path = repo.join("compat/releases.toml");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let record: Record =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{} does not parse:\n{e}", path.display()));
    for r in &record.release {
        assert!(
            r.commit.len() == 40 && r.commit.bytes().all(|b| b.is_ascii_hexdigit()),
            "release {}'s commit in {} is not 40 hex digits: {:?}",
            r.version,
            path.display(),
            r.commit
        );
    }
    record.release
}

// ---------------------------------------------------------------------------------
// Child processes: every one is killed and reaped when its guard drops, pass or fail.

/// A child process, SIGKILLed (its whole process group, when it leads one) and reaped
/// when dropped unfinished.
struct Reaped {
    child: Child,
    group: bool,
}

impl Reaped {
    fn spawn(cmd: &mut Command, what: &str) -> std::io::Result<Reaped> {
        cmd.spawn()
            .map(|child| Reaped {
                child,
                group: false,
            })
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot start {what}: {e}")))
    }

    /// In a process group of its own, so that its children (cargo's rustc) are killed
    /// with it.
    fn spawn_group(cmd: &mut Command, what: &str) -> std::io::Result<Reaped> {
        let mut r = Reaped::spawn(cmd.process_group(0), what)?;
        r.group = true;
        Ok(r)
    }

    /// Waits up to `timeout` for it to exit.
    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() >= deadline => return None,
                Ok(None) => thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("cannot wait for a child process: {e}"),
            }
        }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn kill(&mut self) {
        if self.alive() {
            if self.group {
                if let Ok(pgid) = libc::pid_t::try_from(self.child.id()) {
                    // SAFETY: kill(2) takes no pointers; the group is the one this child
                    // leads (spawned with process_group(0)), and the child is not reaped
                    // yet, so its id is still its own.
                    unsafe { libc::kill(-pgid, libc::SIGKILL) };
                }
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        self.kill();
    }
}

fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut b = Vec::new();
        let _ = r.read_to_end(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    })
}

/// Runs `program ARGS` to the end within `timeout`; a command still running then is
/// killed and fails the test. `Err` only when it cannot be started.
fn try_run(program: &Path, args: &[&str], timeout: Duration) -> std::io::Result<Output> {
    let command = format!("{} {}", program.display(), args.join(" "));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut p = Reaped::spawn(&mut cmd, &command)?;
    let out = drain(p.child.stdout.take().expect("piped"));
    let err = drain(p.child.stderr.take().expect("piped"));
    let status = p.wait_timeout(timeout);
    p.kill();
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            command,
            status,
            stdout,
            stderr,
        }),
        None => panic!(
            "`{command}` did not finish within {timeout:?}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}"
        ),
    }
}

fn run(program: &Path, args: &[&str], timeout: Duration) -> Output {
    try_run(program, args, timeout).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------
// The release's binary: built once from its recorded commit, then cached.

/// `${FERRY_RELEASE_CACHE:-$HOME/.cache/ferry-releases}`.
fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_RELEASE_CACHE").filter(|p| !p.is_empty()) {
        return std::path::absolute(&p).unwrap_or_else(|_| PathBuf::from(p));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Path::new(&home).join(".cache/ferry-releases"),
        None => {
            let p = std::env::temp_dir().join("ferry-releases");
            println!(
                "neither FERRY_RELEASE_CACHE nor HOME is set: caching release builds in {}",
                p.display()
            );
            p
        }
    }
}

/// An exclusive flock on a file, held until dropped (closing the file releases it).
struct BuildLock {
    _file: File,
}

impl BuildLock {
    fn acquire(path: &Path, timeout: Duration) -> BuildLock {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("cannot open the lock file {}: {e}", path.display()));
        let deadline = Instant::now() + timeout;
        let mut told = false;
        loop {
            // SAFETY: flock(2) takes no pointers; the descriptor is `file`'s, open here.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                return BuildLock { _file: file };
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                panic!("cannot lock {}: {e}", path.display());
            }
            if !told {
                println!(
                    "another process is building this release (it holds {}); waiting up to {timeout:?}",
                    path.display()
                );
                told = true;
            }
            assert!(
                Instant::now() < deadline,
                "{} was still locked after {timeout:?}: another build is stuck?",
                path.display()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Why the release's commit cannot be built here (git missing, commit absent), if so.
fn why_no_commit(repo: &Path, version: &str, commit: &str) -> Option<String> {
    let git = Path::new("git");
    let root = repo.to_str().expect("a utf-8 repository path");
    let out = match try_run(git, &["--version"], QUICK) {
        Ok(out) if out.status.success() => {
            let spec = format!("{commit}^{{commit}}");
            run(git, &["-C", root, "cat-file", "-e", &spec], QUICK)
        }
        Ok(out) => return Some(format!("git does not work here: {out}")),
        Err(e) => return Some(format!("git is missing: {e}")),
    };
    (!out.status.success()).then(|| {
        format!(
            "commit {commit} of release {version} is not in the repository at {root} \
             (a shallow clone? `git fetch --unshallow` brings it): {}",
            out.stderr.trim()
        )
    })
}

/// The `ferry` binary of `release`, from the cache or built into it now; `None` (after
/// printing `skipped: ...`) when it cannot be built here.
fn release_binary(repo: &Path, release: &Release) -> Option<PathBuf> {
    let root = cache_root();
    let dir = root.join(&release.commit);
    let bin = dir.join("ferry");
    let cached = |bin: &Path| {
        bin.is_file().then(|| {
            println!(
                "ferry {}: using the cached build {} (delete {} to rebuild)",
                release.version,
                bin.display(),
                dir.display()
            );
            bin.to_path_buf()
        })
    };
    if let Some(bin) = cached(&bin) {
        return Some(bin);
    }
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let real = dir.canonicalize().expect("the cache directory");
    assert!(
        !real.starts_with(repo),
        "the release cache {} is inside the clone {}; set FERRY_RELEASE_CACHE elsewhere",
        real.display(),
        repo.display()
    );
    let _lock = BuildLock::acquire(&dir.join("build.lock"), LOCK_TIMEOUT);
    if let Some(bin) = cached(&bin) {
        return Some(bin);
    }
    if let Some(why) = why_no_commit(repo, &release.version, &release.commit) {
        println!("skipped: cannot build ferry {}: {why}", release.version);
        return None;
    }

    // The commit's tree, as `git archive` gives it: the clone is only read.
    let src = dir.join("src");
    let target = dir.join("target");
    let tar = dir.join("src.tar");
    let _ = fs::remove_dir_all(&src);
    fs::create_dir_all(&src).unwrap_or_else(|e| panic!("cannot create {}: {e}", src.display()));
    let (root_s, tar_s, src_s) = (
        repo.to_str().expect("utf-8 path"),
        tar.to_str().expect("utf-8 path"),
        src.to_str().expect("utf-8 path"),
    );
    let out = run(
        Path::new("git"),
        &[
            "-C",
            root_s,
            "archive",
            "--format=tar",
            "-o",
            tar_s,
            &release.commit,
        ],
        QUICK,
    );
    assert!(out.status.success(), "git archive failed\n{out}");
    let out = run(Path::new("tar"), &["-xf", tar_s, "-C", src_s], QUICK);
    assert!(
        out.status.success(),
        "extracting the release's tree failed\n{out}"
    );
    let _ = fs::remove_file(&tar);

    let log_path = dir.join("build.log");
    let log = File::create(&log_path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!(
        "ferry {}: building commit {} in {} (cargo build --locked --bin ferry; log in {})",
        release.version,
        release.commit,
        src.display(),
        log_path.display()
    );
    let started = Instant::now();
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--locked", "--bin", "ferry"])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", &target)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("a second handle on the build log"))
        .stderr(log);
    let mut build = Reaped::spawn_group(&mut cmd, "cargo build").unwrap_or_else(|e| panic!("{e}"));
    let status = build.wait_timeout(BUILD_TIMEOUT);
    build.kill();
    let took = started.elapsed();
    let output = fs::read_to_string(&log_path).unwrap_or_default();
    match status {
        Some(s) if s.success() => {}
        Some(s) => panic!(
            "building ferry {} from {} failed ({s}) after {:.1} s; the end of cargo's output \
             ({} has all of it):\n{}",
            release.version,
            release.commit,
            took.as_secs_f64(),
            log_path.display(),
            tail(&output, 60)
        ),
        None => panic!(
            "building ferry {} did not finish within {BUILD_TIMEOUT:?}; the end of cargo's \
             output:\n{}",
            release.version,
            tail(&output, 60)
        ),
    }
    let partial = dir.join("ferry.partial");
    fs::copy(target.join("debug/ferry"), &partial)
        .unwrap_or_else(|e| panic!("cannot copy the built binary into {}: {e}", dir.display()));
    fs::rename(&partial, &bin).unwrap_or_else(|e| panic!("cannot place {}: {e}", bin.display()));
    let _ = fs::remove_dir_all(&src);
    let _ = fs::remove_dir_all(&target);
    println!(
        "ferry {}: built in {:.1} s, cached as {}",
        release.version,
        took.as_secs_f64(),
        bin.display()
    );
    Some(bin)
}

/// The binary says it is `release` and dumps exactly the release's golden dump.
fn check_is_release(bin: &Path, repo: &Path, release: &Release) {
    let out = run(bin, &["--version"], QUICK);
    assert!(
        out.status.success() && out.stdout.contains(&release.version),
        "{} does not say it is {}\n{out}",
        bin.display(),
        release.version
    );
    let out = run(bin, &["dump-vmstate", "-"], QUICK);
    assert!(out.status.success(), "{out}");
    let dump: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("`{}` is not JSON: {e}", out.command));
    let golden_path = repo.join(&release.dump);
    let golden: Value = serde_json::from_str(
        &fs::read_to_string(&golden_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", golden_path.display())),
    )
    .unwrap_or_else(|e| panic!("{} is not JSON: {e}", golden_path.display()));
    assert!(
        dump == golden,
        "{} built from {} does not dump the golden {}: not the release",
        bin.display(),
        release.commit,
        golden_path.display()
    );
}

// ---------------------------------------------------------------------------------
// The two builds and their command lines.

/// One side's `ferry`: the release's or this build's, with the options its commands take.
struct Build {
    label: String,
    bin: PathBuf,
    commands: BTreeSet<String>,
    run_options: BTreeSet<String>,
    migrate_options: BTreeSet<String>,
    /// The machine types it knows, newest first.
    machines: Vec<String>,
    /// Its `--accel` takes the host's `precopy=on|off` (0.2 on).
    accel_precopy: bool,
}

/// The machine types `ferry machines --json` lists, newest first.
fn machines(bin: &Path) -> Vec<String> {
    let out = run(bin, &["machines", "--json"], QUICK);
    assert!(out.status.success(), "{out}");
    let v: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("`{}` is not JSON: {e}", out.command));
    v.as_array()
        .expect("a list of machine types")
        .iter()
        .map(|m| m["name"].as_str().expect("a name").to_string())
        .collect()
}

/// The subcommands `ferry --help` lists.
fn commands(bin: &Path) -> BTreeSet<String> {
    let out = run(bin, &["--help"], QUICK);
    assert!(out.status.success(), "{out}");
    out.stdout
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// The `--long` options `ferry SUBCOMMAND --help` lists.
fn options(bin: &Path, sub: &str) -> BTreeSet<String> {
    let out = run(bin, &[sub, "--help"], QUICK);
    assert!(out.status.success(), "{out}");
    out.stdout
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[' || c == '<')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .collect()
}

impl Build {
    fn new(label: &str, bin: &Path) -> Build {
        Build {
            label: label.to_string(),
            bin: bin.to_path_buf(),
            commands: commands(bin),
            run_options: options(bin, "run"),
            migrate_options: options(bin, "migrate"),
            machines: machines(bin),
            accel_precopy: {
                let out = run(bin, &["run", "--help"], QUICK);
                out.stdout.contains("precopy=on|off")
            },
        }
    }

    fn require(&self, sub: &str, opts: &[&str]) {
        let have = match sub {
            "run" => &self.run_options,
            _ => &self.migrate_options,
        };
        let missing: Vec<&str> = opts
            .iter()
            .copied()
            .filter(|o| !have.contains(*o))
            .collect();
        assert!(
            missing.is_empty(),
            "`ferry {sub}` of {} ({}) lacks {missing:?}; it has {have:?}",
            self.label,
            self.bin.display()
        );
    }
}

/// Prints what one build's `ferry --help` and `ferry SUB --help` offer that the other's
/// do not.
fn print_option_differences(old: &Build, new: &Build) {
    for (sub, what, o, n) in [
        ("", "subcommands", &old.commands, &new.commands),
        (" run", "options", &old.run_options, &new.run_options),
        (
            " migrate",
            "options",
            &old.migrate_options,
            &new.migrate_options,
        ),
    ] {
        let only_new: Vec<&String> = n.difference(o).collect();
        let only_old: Vec<&String> = o.difference(n).collect();
        if only_new.is_empty() && only_old.is_empty() {
            println!(
                "`ferry{sub}`: {} and {} have the same {what}",
                old.label, new.label
            );
        } else {
            println!(
                "`ferry{sub}`: only {} has {only_new:?}; only {} has {only_old:?}",
                new.label, old.label
            );
        }
    }
}

// ---------------------------------------------------------------------------------
// VMs of either build.

/// One `ferry run` process of either build, QMP at `<dir>/<name>.sock`, stderr in
/// `<dir>/<name>.log`; killed and reaped when dropped.
/// `ferry run` of one build, as the common test VM with that build's binary.
fn start_vm(build: &Build, dir: &TestDir, name: &str, args: &[&str]) -> Vm {
    Vm::start_program(
        &build.bin,
        dir,
        name,
        &format!("{name} ({})", build.label),
        args,
    )
}

// ---------------------------------------------------------------------------------
// The cells.

/// An accelerator on both sides, and whether each side's host can precopy it (for a
/// build whose `--accel` has no such switch, the value does not apply: it cannot).
#[derive(Clone, Copy)]
struct AccelCell {
    src_precopy: bool,
    dst_precopy: bool,
}

struct Cell<'a> {
    src: &'a Build,
    dst: &'a Build,
    machine: String,
    channels: u16,
    accel: Option<AccelCell>,
}

impl Cell<'_> {
    fn name(&self) -> String {
        let ch = match self.channels {
            0 => "0 channels (pages on the main channel)".to_string(),
            1 => "1 channel".to_string(),
            n => format!("{n} channels"),
        };
        let accel = match self.accel {
            None => String::new(),
            Some(a) => {
                let host = |b: &Build, on: bool| {
                    if !b.accel_precopy {
                        String::new()
                    } else if on {
                        format!(", {} host precopy on", b.label)
                    } else {
                        format!(", {} host precopy off", b.label)
                    }
                };
                format!(
                    ", accelerator {ACCEL}{}{}",
                    host(self.src, a.src_precopy),
                    host(self.dst, a.dst_precopy)
                )
            }
        };
        format!(
            "{} -> {} on {}, {ch}{accel}",
            self.src.label, self.dst.label, self.machine
        )
    }

    /// `--accel` as `b` takes it.
    fn accel_arg(b: &Build, precopy: bool) -> String {
        if b.accel_precopy {
            format!("{ACCEL},precopy={}", if precopy { "on" } else { "off" })
        } else {
            ACCEL.to_string()
        }
    }

    /// How the accelerator should move: precopy only on a machine type with
    /// switchover-ack, between builds that both have precopy, with both hosts able.
    fn expect_precopy(&self) -> bool {
        self.accel.is_some_and(|a| {
            self.machine != "ferry-0.1"
                && self.src.accel_precopy
                && self.dst.accel_precopy
                && a.src_precopy
                && a.dst_precopy
        })
    }
}

/// What a completed cell reports.
struct Hop {
    summary: String,
    json: Value,
}

fn ms(v: &Value) -> String {
    v.as_u64()
        .map_or_else(|| format!("{v}"), |n| format!("{n} ms"))
}

/// The VM arguments of one side of a cell.
fn vm_args(cell: &Cell<'_>, side: &Build, precopy: bool, backend: &str) -> Vec<String> {
    let mut vm: Vec<String> = ["--backend", backend, "--machine", &cell.machine]
        .iter()
        .chain(GUEST)
        .map(|s| s.to_string())
        .collect();
    if cell.accel.is_some() {
        vm.push("--accel".into());
        vm.push(Cell::accel_arg(side, precopy));
    }
    vm
}

/// One migration of a running guest from a `cell.src` VM to a `cell.dst` VM, checked.
fn run_cell(cell: &Cell<'_>, backend: &str, n: usize) -> Hop {
    let name = cell.name();
    let dir = TestDir::new(&format!("cross-release-{n}"));
    let (sp, dp) = cell
        .accel
        .map_or((false, false), |a| (a.src_precopy, a.dst_precopy));
    let vm = vm_args(cell, cell.src, sp, backend);
    let vm: Vec<&str> = vm.iter().map(String::as_str).collect();
    let mut src = start_vm(cell.src, &dir, "source", &vm);
    let mut incoming = vm_args(cell, cell.dst, dp, backend);
    incoming.extend(["--incoming".to_string(), "tcp:127.0.0.1:0".to_string()]);
    let incoming: Vec<&str> = incoming.iter().map(String::as_str).collect();
    let mut dst = start_vm(cell.dst, &dir, "destination", &incoming);
    let uri = dst.uri();
    let mut s = src.qmp();
    let mut d = dst.qmp();
    assert_eq!(run_state(&mut s), "running", "{name}: source{}", src.ctx());
    assert_guest_progresses(&mut s, &format!("{name}: source"));
    assert_eq!(
        run_state(&mut d),
        "inmigrate",
        "{name}: destination{}",
        dst.ctx()
    );

    // The source's own release's `ferry migrate`, as its user would run it. A release's
    // binary is a debug build (it builds in half the time), which moves an accelerator's
    // stop-copy state at a fraction of a release build's rate: a source that counts that
    // state against the default 300 ms limit (0.2 on) would rightly keep waiting for a
    // higher one, so the accelerator cells raise it, as README tells a user to.
    let channels = cell.channels.to_string();
    let mut args = vec![
        "migrate",
        "--qmp",
        src.qmp_path(),
        &uri,
        "--json",
        "--channels",
        &channels,
    ];
    if cell.accel.is_some() {
        args.extend(["--downtime-limit", "20000"]);
    }
    let out = run(&cell.src.bin, &args, MIGRATE_TIMEOUT);
    let ctx = |extra: &str| format!("{name}: {extra}\n{out}{}{}", src.ctx(), dst.ctx());
    assert!(out.status.success(), "{}", ctx("ferry migrate failed"));
    let last = out.last_json();
    assert_eq!(last["status"], "completed", "{}", ctx("status"));
    let verified = last["verified"].as_str().unwrap_or_default().to_string();
    assert!(
        verified == "digest" || verified == "digest+full",
        "{}",
        ctx(&format!(
            "verified is {:?}, not digest or digest+full",
            last["verified"]
        ))
    );
    assert!(
        last["ram"]["transferred"].as_u64().unwrap_or(0) > 0,
        "{}",
        ctx("no RAM transferred")
    );
    let m = &last["multifd"];
    if cell.channels == 0 {
        assert!(
            m.is_null(),
            "{}",
            ctx("data channels reported for --channels 0")
        );
    } else {
        assert_eq!(m["channels"], cell.channels, "{}", ctx("multifd.channels"));
        let per = m["per-channel"].as_array().map_or(0, Vec::len);
        assert_eq!(
            per,
            usize::from(cell.channels),
            "{}",
            ctx("multifd.per-channel")
        );
    }

    // The source let go, the destination has it all and carries on.
    assert_eq!(run_state(&mut s), "postmigrate", "{}", ctx("source state"));
    let src_final = passes(&mut s);
    let beyond = wait_passes_beyond(&mut d, &src_final, &format!("{name}: destination"));
    wait_passes_beyond(&mut d, &beyond, &format!("{name}: destination"));
    assert_guest_intact(&mut d, &format!("{name}: destination"));
    assert_eq!(run_state(&mut d), "running", "{}", ctx("destination state"));
    assert_eq!(
        passes(&mut s),
        src_final,
        "{}",
        ctx("the source's guest ran after it migrated away")
    );
    let q = query_migrate(&mut s);
    assert_eq!(
        q["status"],
        "completed",
        "{}",
        ctx(&format!("source query-migrate {q}"))
    );

    let mut how = String::new();
    if cell.accel.is_some() {
        let (sa, da) = (
            exec(&mut s, "x-ferry-accel", Value::Null),
            exec(&mut d, "x-ferry-accel", Value::Null),
        );
        let what = format!("accelerator: source {sa}, destination {da}");
        assert_eq!(sa["state"], "STOP", "{}", ctx(&what));
        assert_eq!(da["state"], "RUNNING", "{}", ctx(&what));
        assert!(sa["saved-digest"].is_string(), "{}", ctx(&what));
        assert_eq!(da["loaded-digest"], sa["saved-digest"], "{}", ctx(&what));
        // A source that reports devices says how the accelerator moved.
        if let Some(devs) = last["devices"].as_array() {
            let dev = devs
                .iter()
                .find(|d| d["name"] == "accel")
                .unwrap_or_else(|| panic!("{}", ctx("no accel among the devices")));
            let want = if cell.expect_precopy() {
                "precopy"
            } else {
                "stop-copy"
            };
            assert_eq!(dev["mode"], want, "{}", ctx(&format!("device {dev}")));
            how = format!(", accel {want}");
        }
    }

    // Both leave cleanly.
    for (vm, c) in [(&mut src, &mut s), (&mut dst, &mut d)] {
        let _ = c.execute("quit", Value::Null);
        let st = vm.wait_exit(QUIT_TIMEOUT);
        assert!(
            st.is_some_and(|s| s.success()),
            "{name}: {} exited with {st:?} after quit{}",
            vm.name,
            vm.ctx()
        );
    }

    let mib = last["ram"]["transferred"].as_u64().unwrap_or(0) as f64 / f64::from(1 << 20);
    Hop {
        summary: format!(
            "total {}, downtime {}, {mib:.1} MiB, verified {verified}{how}",
            ms(&last["total-time"]),
            ms(&last["downtime"]),
        ),
        json: last,
    }
}

/// This build's guest on a machine type `release` does not know: refused before any
/// RAM moves, naming the machine type, with the source still running. (The other way
/// cannot even start: `release` has no such machine type to run a guest on.)
fn run_refused_cell(new: &Build, old: &Build, machine: &str, backend: &str, n: usize) -> String {
    let name = format!("{} -> {} on {machine}", new.label, old.label);
    let dir = TestDir::new(&format!("cross-release-{n}"));
    let mut src = start_vm(
        new,
        &dir,
        "source",
        &[&["--backend", backend, "--machine", machine], GUEST].concat(),
    );
    let dst = start_vm(
        old,
        &dir,
        "destination",
        &[
            &["--backend", backend, "--incoming", "tcp:127.0.0.1:0"],
            GUEST,
        ]
        .concat(),
    );
    let uri = dst.uri();
    let mut s = src.qmp();
    let out = run(
        &new.bin,
        &["migrate", "--qmp", src.qmp_path(), &uri, "--json"],
        MIGRATE_TIMEOUT,
    );
    let ctx = |extra: &str| format!("{name}: {extra}\n{out}{}{}", src.ctx(), dst.ctx());
    assert!(
        !out.status.success(),
        "{}",
        ctx("the migration was not refused")
    );
    let last = out.last_json();
    assert_eq!(last["status"], "failed", "{}", ctx("status"));
    let err = last["error-desc"].as_str().unwrap_or_default().to_string();
    assert!(
        err.contains("refused") && err.contains(machine) && err.contains("unknown"),
        "{}",
        ctx("the refusal does not name the machine type")
    );
    assert_eq!(
        last["ram"]["transferred"].as_u64(),
        Some(0),
        "{}",
        ctx("RAM moved before the refusal")
    );
    assert_eq!(run_state(&mut s), "running", "{}", ctx("source state"));
    assert_guest_progresses(&mut s, &format!("{name}: source"));
    let _ = s.execute("quit", Value::Null);
    src.wait_exit(QUIT_TIMEOUT);
    drop(dst);

    // And the release cannot start a guest on it.
    let started = run(
        &old.bin,
        &[&["run", "--backend", backend, "--machine", machine], GUEST].concat(),
        QUICK,
    );
    assert!(
        !started.status.success() && started.stderr.contains(machine),
        "{name}: {} started a guest on {machine}, which it does not know\n{started}",
        old.label
    );
    format!("refused before RAM moved: {err}")
}

/// The panic message of a failed cell.
fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".to_string())
}

/// Every key path of a JSON object (`ram.transferred`, `passes[].pages`).
fn key_paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(p.clone());
                key_paths(v, &p, out);
            }
        }
        Value::Array(a) => {
            for v in a {
                key_paths(v, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

/// Prints which fields of `ferry migrate --json`'s final object one build gives and the
/// other does not, from a cell of each with the same route.
fn print_json_differences(old: &str, old_json: &Value, new: &str, new_json: &Value) {
    let (mut o, mut n) = (BTreeSet::new(), BTreeSet::new());
    key_paths(old_json, "", &mut o);
    key_paths(new_json, "", &mut n);
    let only_new: Vec<&String> = n.difference(&o).collect();
    let only_old: Vec<&String> = o.difference(&n).collect();
    if only_new.is_empty() && only_old.is_empty() {
        println!("`ferry migrate --json`: {old} and {new} report the same fields");
    } else {
        println!(
            "`ferry migrate --json`: only {new} reports {only_new:?}; only {old} reports {only_old:?}"
        );
    }
}

/// The cells between `old` and this build (see the module docs).
fn cells_with<'a>(old: &'a Build, new: &'a Build, kvm: bool) -> (Vec<Cell<'a>>, Vec<String>) {
    let mut cells = Vec::new();
    let mut refused = Vec::new();
    // Every machine type of the release, newest first, is shared; this build's newer
    // ones are not.
    for machine in &new.machines {
        if !old.machines.contains(machine) {
            refused.push(machine.clone());
            continue;
        }
        // The plain cells on the release's newest machine type only; the accelerator
        // cells on every shared one.
        let plain = old.machines.first() == Some(machine);
        for (src, dst) in [(old, new), (new, old)] {
            if plain {
                for channels in CHANNELS {
                    cells.push(Cell {
                        src,
                        dst,
                        machine: machine.clone(),
                        channels,
                        accel: None,
                    });
                }
            }
            // Releases before 0.2 have the accelerator on KVM only.
            let accel_here = kvm || (src.accel_precopy && dst.accel_precopy);
            if !accel_here {
                continue;
            }
            let hosts: &[(bool, bool)] = match (src.accel_precopy, dst.accel_precopy) {
                (true, true) => &[(true, true), (true, false), (false, true)],
                (true, false) => &[(true, false), (false, false)],
                (false, true) => &[(false, true), (false, false)],
                (false, false) => &[(false, false)],
            };
            for &(src_precopy, dst_precopy) in hosts {
                for channels in ACCEL_CHANNELS {
                    cells.push(Cell {
                        src,
                        dst,
                        machine: machine.clone(),
                        channels,
                        accel: Some(AccelCell {
                            src_precopy,
                            dst_precopy,
                        }),
                    });
                }
            }
        }
    }
    (cells, refused)
}

#[test]
fn migrates_to_and_from_every_recorded_release() {
    let _one_at_a_time = serial();
    let started = Instant::now();
    let repo = repo();
    let new = Build::new("current", Path::new(FERRY));
    let (backend, kvm) = match ferry_vmm::vmm::kvm_usable() {
        Ok(()) => ("kvm", true),
        Err(e) => {
            println!(
                "KVM is not usable here ({}): running every cell on the soft backend \
                 instead (accelerator cells only with releases that have it there)",
                error_chain(&e)
            );
            ("soft", false)
        }
    };
    let mut failed = Vec::new();
    let mut total = 0;
    for release in read_releases(&repo) {
        let Some(old_bin) = release_binary(&repo, &release) else {
            continue;
        };
        check_is_release(&old_bin, &repo, &release);
        let old = Build::new(&release.version, &old_bin);
        print_option_differences(&old, &new);
        assert_eq!(
            old.machines.first(),
            Some(&release.machine),
            "{} does not have its recorded machine type first",
            old.label
        );
        let run_needs: &[&str] = &[
            "--backend",
            "--mem",
            "--dirty",
            "--machine",
            "--incoming",
            "--qmp",
            "--accel",
        ];
        for b in [&old, &new] {
            b.require("run", run_needs);
            b.require(
                "migrate",
                &["--qmp", "--json", "--channels", "--downtime-limit"],
            );
        }

        let (cells, refused) = cells_with(&old, &new, kvm);
        let mut results = Vec::new();
        for (n, cell) in cells.iter().enumerate() {
            let t = Instant::now();
            let r = panic::catch_unwind(AssertUnwindSafe(|| run_cell(cell, backend, n)));
            let secs = t.elapsed().as_secs_f64();
            match &r {
                Ok(hop) => println!(
                    "ok      {} ({backend}, {secs:.1} s): {}",
                    cell.name(),
                    hop.summary
                ),
                Err(e) => {
                    println!(
                        "FAILED  {} ({backend}, {secs:.1} s): {}",
                        cell.name(),
                        panic_text(e.as_ref())
                    );
                    failed.push(format!("{}: {}", cell.name(), panic_text(e.as_ref())));
                }
            }
            results.push((cell, r));
        }
        for (k, machine) in refused.iter().enumerate() {
            let t = Instant::now();
            let name = format!("{} -> {} on {machine}", new.label, old.label);
            let r = panic::catch_unwind(AssertUnwindSafe(|| {
                run_refused_cell(&new, &old, machine, backend, cells.len() + k)
            }));
            let secs = t.elapsed().as_secs_f64();
            match r {
                Ok(what) => println!("ok      {name} ({backend}, {secs:.1} s): {what}"),
                Err(e) => {
                    println!(
                        "FAILED  {name} ({backend}, {secs:.1} s): {}",
                        panic_text(e.as_ref())
                    );
                    failed.push(format!("{name}: {}", panic_text(e.as_ref())));
                }
            }
        }
        total += cells.len() + refused.len();

        let json_of = |src: &Build| {
            results.iter().find_map(|(c, r)| match r {
                Ok(hop) if c.src.label == src.label && c.channels == 4 && c.accel.is_none() => {
                    Some(&hop.json)
                }
                _ => None,
            })
        };
        if let (Some(o), Some(n)) = (json_of(&old), json_of(&new)) {
            print_json_differences(&old.label, o, &new.label, n);
        }
    }
    println!(
        "{} of {total} cells passed on the {backend} backend in {:.1} s",
        total - failed.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failed.is_empty(),
        "{} cell(s) failed:\n{}",
        failed.len(),
        failed.join("\n\n")
    );
}
