//! Running the `ferry` binary as a user would, for the CLI tests: `ferry run` processes
//! that are killed when the test ends (pass or fail), one-shot `ferry` commands with a
//! time limit, a temp dir per test for sockets and logs, and QMP helpers.

#![allow(dead_code)]

pub mod engine;
pub mod netns;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ferry_vmm::qmp::QmpClient;
use serde_json::Value;

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// What `ferry run --incoming` prints on stdout once it listens.
pub const LISTENING: &str = "listening for an incoming migration on ";

/// How long a VM may take to come up (QMP socket answering, URI printed).
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a `ferry migrate` may take; the tests' migrations take well under a second.
pub const MIGRATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a guest may take to show progress.
pub const PROGRESS_TIMEOUT: Duration = Duration::from_secs(10);

/// The tests that start VMs run one at a time: each VM's guest keeps a core busy, and
/// two migrations at once on a 2-core machine would measure the machine, not ferry.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether the KVM tests can run; prints why not when they cannot.
pub fn kvm_or_skip() -> bool {
    match ferry_vmm::vmm::kvm_usable() {
        Ok(()) => true,
        Err(e) => {
            println!("skipped: KVM is not usable here: {e}");
            false
        }
    }
}

/// A directory for one test's sockets and logs, removed when the test ends.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(test: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "ferry-cli-{}-{}-{test}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create the test's temp dir");
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// SIGKILLs `child` and every process it started (`ferry demo` runs two `ferry run`s,
/// which its own cleanup would stop, but not when it is killed), then reaps `child`.
fn kill_and_reap(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        // Not reaped, so its pid, and its children's, are still theirs.
        let mut tree = Vec::new();
        descendants(child.id(), &mut tree);
        let _ = child.kill();
        for pid in tree {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill(2) takes no pointers; `pid` is a process this test started
                // (directly or through `child`), found under /proc a moment ago.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = child.wait();
}

/// Appends the pids of `pid`'s children, grandchildren and so on, from /proc.
fn descendants(pid: u32, out: &mut Vec<u32>) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    let children: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&p| parent_of(p) == Some(pid))
        .collect();
    for c in children {
        out.push(c);
        descendants(c, out);
    }
}

/// The parent pid in /proc/PID/stat: `pid (comm) state ppid ...`, where comm may hold
/// spaces and parentheses.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("cannot wait for a child process: {e}"),
        }
    }
}

/// One `ferry run` process with its QMP socket at `<dir>/<name>.sock` and its stderr in
/// `<dir>/<name>.log`. Killed (SIGKILL) when dropped.
pub struct Vm {
    pub name: String,
    child: Child,
    qmp: PathBuf,
    log: PathBuf,
    stdout: Receiver<String>,
}

impl Vm {
    /// `ferry run ARGS --qmp <dir>/<name>.sock`.
    pub fn start(dir: &TestDir, name: &str, args: &[&str]) -> Vm {
        Vm::start_program(Path::new(FERRY), dir, name, name, args)
    }

    /// `PROGRAM run ARGS --qmp <dir>/<name>.sock` with another `ferry` binary (an older
    /// release); `label` names it in messages.
    pub fn start_program(
        program: &Path,
        dir: &TestDir,
        name: &str,
        label: &str,
        args: &[&str],
    ) -> Vm {
        let qmp = dir.join(&format!("{name}.sock"));
        let log = dir.join(&format!("{name}.log"));
        let err = std::fs::File::create(&log).expect("create a VM log");
        let mut child = Command::new(program)
            .arg("run")
            .args(args)
            .arg("--qmp")
            .arg(&qmp)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("start ferry run");
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
            name: label.to_string(),
            child,
            qmp,
            log,
            stdout,
        }
    }

    /// `ferry run ARGS --incoming tcp:127.0.0.1:0`: a destination on a free port.
    pub fn incoming(dir: &TestDir, name: &str, args: &[&str]) -> Vm {
        let mut a = args.to_vec();
        a.extend(["--incoming", "tcp:127.0.0.1:0"]);
        Vm::start(dir, name, &a)
    }

    pub fn qmp_path(&self) -> &str {
        self.qmp.to_str().expect("utf-8 temp path")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the VM wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log, framed for a failure message.
    pub fn ctx(&self) -> String {
        format!("\n--- {} log ---\n{}--- end ---", self.name, self.log())
    }

    /// The URI a `--incoming` VM printed on stdout.
    pub fn uri(&self) -> String {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => match line.strip_prefix(LISTENING) {
                    Some(uri) => return uri.trim().to_string(),
                    None => seen.push(line),
                },
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{} printed no `{LISTENING}URI` line within {START_TIMEOUT:?}; stdout {seen:?}{}",
                    self.name,
                    self.ctx()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{} closed stdout without printing `{LISTENING}URI`; stdout {seen:?}{}",
                    self.name,
                    self.ctx()
                ),
            }
        }
    }

    /// A QMP connection, retried until the socket answers.
    pub fn qmp(&mut self) -> QmpClient {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match QmpClient::connect(&self.qmp) {
                Ok(c) => return c,
                Err(e) => {
                    if let Ok(Some(s)) = self.child.try_wait() {
                        panic!(
                            "{} exited ({s}) before its QMP socket answered: {e}{}",
                            self.name,
                            self.ctx()
                        );
                    }
                    if Instant::now() >= deadline {
                        panic!(
                            "{}'s QMP socket did not answer within {START_TIMEOUT:?}: {e}{}",
                            self.name,
                            self.ctx()
                        );
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_timeout(&mut self.child, timeout)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// What a finished `ferry` command left.
#[derive(Debug)]
pub struct Output {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The last non-empty stdout line, parsed as JSON.
    pub fn last_json(&self) -> Value {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_else(|| panic!("`{}` printed nothing on stdout\n{self}", self.command));
        serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("`{}`: last line is not JSON: {e}\n{self}", self.command))
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited with {}\n--- stdout ---\n{}--- stderr ---\n{}--- end ---",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

/// A `ferry` command running in the background; killed if dropped unfinished.
pub struct Running {
    command: String,
    child: Option<Child>,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
}

fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut b = Vec::new();
        let _ = r.read_to_end(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    })
}

/// Starts `ferry ARGS`.
pub fn spawn_ferry(args: &[&str]) -> Running {
    spawn(Command::new(FERRY).args(args), args)
}

fn spawn(cmd: &mut Command, args: &[&str]) -> Running {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferry");
    let out = drain(child.stdout.take().expect("piped"));
    let err = drain(child.stderr.take().expect("piped"));
    Running {
        command: format!("ferry {}", args.join(" ")),
        child: Some(child),
        out: Some(out),
        err: Some(err),
    }
}

impl Running {
    /// Waits for the command; a command still running after `timeout` is killed and
    /// fails the test.
    pub fn finish(mut self, timeout: Duration) -> Output {
        let mut child = self.child.take().expect("not finished yet");
        let status = wait_timeout(&mut child, timeout);
        if status.is_none() {
            kill_and_reap(&mut child);
        }
        let stdout = self.out.take().expect("once").join().unwrap_or_default();
        let stderr = self.err.take().expect("once").join().unwrap_or_default();
        match status {
            Some(status) => Output {
                command: self.command.clone(),
                status,
                stdout,
                stderr,
            },
            None => panic!(
                "`{}` did not finish within {timeout:?}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}",
                self.command
            ),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            kill_and_reap(c);
        }
    }
}

/// Runs `ferry ARGS` to the end, within `timeout`.
pub fn ferry(args: &[&str], timeout: Duration) -> Output {
    spawn_ferry(args).finish(timeout)
}

/// Like [`ferry`], with `dir` as TMPDIR: for commands that make temp files of their
/// own (`ferry demo`), so that nothing is left behind if they are killed.
pub fn ferry_in(dir: &TestDir, args: &[&str], timeout: Duration) -> Output {
    spawn(
        Command::new(FERRY).args(args).env("TMPDIR", dir.path()),
        args,
    )
    .finish(timeout)
}

/// Polls `f` every 20 ms until it gives a value; fails the test after `timeout`.
pub fn wait_for<T>(
    timeout: Duration,
    what: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {}", what());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a QMP command that must succeed.
pub fn exec(c: &mut QmpClient, command: &str, args: Value) -> Value {
    c.execute(command, args)
        .unwrap_or_else(|e| panic!("QMP {command} failed: {}", error_chain(&e)))
}

/// `query-status`'s `status`.
pub fn run_state(c: &mut QmpClient) -> String {
    exec(c, "query-status", Value::Null)["status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// `x-ferry-guest`'s passes, one per vCPU.
pub fn passes(c: &mut QmpClient) -> Vec<u64> {
    let g = exec(c, "x-ferry-guest", Value::Null);
    g["passes"]
        .as_array()
        .unwrap_or_else(|| panic!("x-ferry-guest has no passes: {g}"))
        .iter()
        .map(|p| p.as_u64().expect("a pass count"))
        .collect()
}

/// Whether every vCPU's pass count in `now` is beyond the one in `then`.
pub fn all_beyond(now: &[u64], then: &[u64]) -> bool {
    now.len() == then.len() && now.iter().zip(then).all(|(a, b)| a > b)
}

/// Waits until every vCPU's workload is beyond `then`; returns the passes then.
pub fn wait_passes_beyond(c: &mut QmpClient, then: &[u64], who: &str) -> Vec<u64> {
    let deadline = Instant::now() + PROGRESS_TIMEOUT;
    loop {
        let last = passes(c);
        if all_beyond(&last, then) {
            return last;
        }
        if Instant::now() >= deadline {
            panic!(
                "{who}'s guest did not get beyond passes {then:?} within {PROGRESS_TIMEOUT:?}: at {last:?}"
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The guest's workload is making progress now.
pub fn assert_guest_progresses(c: &mut QmpClient, who: &str) -> Vec<u64> {
    let now = passes(c);
    wait_passes_beyond(c, &now, who)
}

/// `x-ferry-verify` found every page the workload dirties intact.
pub fn assert_guest_intact(c: &mut QmpClient, who: &str) {
    // A destination reports `running` a moment after the source has heard `Completed`
    // (its side winds down first); until then its guest is not there to verify.
    let deadline = Instant::now() + Duration::from_secs(5);
    let v = loop {
        match c.execute("x-ferry-verify", Value::Null) {
            Ok(v) => break v,
            Err(e) if error_chain(&e).contains("inmigrate") && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("x-ferry-verify on {who} failed: {}", error_chain(&e)),
        }
    };
    let checked = v["pages-checked"].as_u64().unwrap_or(0);
    assert!(checked > 0, "x-ferry-verify on {who} checked no pages: {v}");
    assert_eq!(
        v["pages-wrong"].as_u64(),
        Some(0),
        "x-ferry-verify on {who} found wrong pages: {v}"
    );
}

/// `query-migrate`.
pub fn query_migrate(c: &mut QmpClient) -> Value {
    exec(c, "query-migrate", Value::Null)
}

/// An error and its sources, `: `-separated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
