//! `ferry migrate` and `ferry status`: QMP clients of a running `ferry run`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use ferry_migration::engine::{human_bytes, DeviceStats, Handover, MigrationInfo, MigrationStatus};
use ferry_vmm::qmp::QmpClient;
use ferry_vmm::report::progress::{GuestProgress, Sample};
use ferry_vmm::report::{self, ReportContext};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use super::{parse_size, qmp_path, CliError, CliResult};

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// QMP socket of the VM to migrate (PATH or unix:PATH)
    #[arg(long, value_parser = qmp_path)]
    pub qmp: PathBuf,
    /// Where to: tcp:HOST:PORT or unix:PATH of a `ferry run --incoming`
    pub uri: String,
    /// Longest guest pause to aim for at switchover, in milliseconds
    #[arg(long, value_name = "MS")]
    pub downtime_limit: Option<u64>,
    /// Cap on the migration's bandwidth, bytes per second (e.g. 500M)
    #[arg(long, value_parser = parse_size)]
    pub max_bandwidth: Option<u64>,
    /// Data channels to carry the guest's pages, 1 to 16, or 0 to send them on the main
    /// channel; the destination follows [default: the VM's setting, 2 unless changed]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=16))]
    pub channels: Option<u16>,
    /// Compression of the pages on the data channels; zstd at the VM's
    /// migration.multifd-zstd-level [default: the VM's setting, none unless changed]
    #[arg(long, value_enum, value_name = "METHOD")]
    pub compression: Option<CompressionArg>,
    /// Print one JSON object per update instead of a progress bar
    #[arg(long)]
    pub json: bool,
    /// Start the migration and return at once
    #[arg(long, conflicts_with = "report")]
    pub detach: bool,
    /// When the migration ends, write an HTML report of it (timeline, downtime breakdown,
    /// the guest's pass rate and the throttle over time) to FILE
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Seconds to read the guest's pass rate before starting the migration, the
    /// baseline its rate during the migration is measured against [default: 1 with
    /// --report, else 0: the migration starts at once]
    #[arg(long, value_name = "SECS", value_parser = baseline_secs)]
    pub baseline: Option<f64>,
    /// QMP socket of the destination VM (PATH or unix:PATH): after the migration, read
    /// the guest's pass rate there for about a second
    #[arg(long, value_name = "SOCK", value_parser = qmp_path, conflicts_with = "detach")]
    pub dest_qmp: Option<PathBuf>,
    /// Migrate with TLS: the VM must have credentials (ferry run --tls-creds DIR, or QMP
    /// migrate-set-parameters tls-creds); fails, before anything moves, if it has none.
    /// A VM with credentials migrates with TLS in any case
    #[arg(long)]
    pub tls: bool,
    /// The name to check in the destination's certificate (QMP tls-hostname)
    /// [default: the VM's setting, else the host of URI]
    #[arg(long, value_name = "NAME", requires = "tls")]
    pub tls_hostname: Option<String>,
}

fn baseline_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds from 0 to 3600")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressionArg {
    None,
    Zstd,
}

impl CompressionArg {
    fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Zstd => "zstd",
        }
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// QMP socket of the VM (PATH or unix:PATH)
    #[arg(long, value_parser = qmp_path)]
    pub qmp: PathBuf,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

fn connect(path: &std::path::Path) -> Result<QmpClient, CliError> {
    QmpClient::connect(path).map_err(|e| {
        CliError::msg(format!(
            "cannot reach a VM at {}: {}; is `ferry run --qmp {}` running?",
            path.display(),
            super::chain(&e),
            path.display()
        ))
    })
}

/// Whether the VM's next migration sends pages on data channels.
fn multifd_on(c: &mut QmpClient) -> Result<bool, CliError> {
    let caps = c.execute("query-migrate-capabilities", Value::Null)?;
    Ok(caps.as_array().is_some_and(|caps| {
        caps.iter()
            .any(|cap| cap["capability"] == "multifd" && cap["state"] == true)
    }))
}

/// Reads `query-migrate` into the engine's type.
pub fn query_migrate(c: &mut QmpClient) -> Result<MigrationInfo, CliError> {
    let v = c.execute("query-migrate", Value::Null)?;
    serde_json::from_value(v)
        .map_err(|e| CliError::msg(format!("unexpected query-migrate reply: {e}")))
}

/// Set by SIGINT while `ferry migrate` follows a migration.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From here on Ctrl-C asks what to do with the migration instead of leaving it
/// without a word (see [`on_interrupt`]).
fn catch_interrupt() {
    let handler: extern "C" fn(libc::c_int) = on_sigint;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
    }
}

/// What Ctrl-C during `ferry migrate` does. On a terminal it asks: cancel (the guest
/// stays at the source, if the switchover has not committed), keep following, or leave
/// with the migration going on. Elsewhere it cancels, as `virsh migrate` does, and a
/// second Ctrl-C leaves at once. Either way it says what happened.
enum Interrupt {
    Follow,
    Leave,
}

fn on_interrupt(c: &mut QmpClient, qmp: &std::path::Path, bar: Option<&ProgressBar>) -> Interrupt {
    let say = |s: &str| match bar {
        Some(b) => b.println(s),
        None => eprintln!("{s}"),
    };
    let goes_on = format!(
        "ferry: the migration goes on in the VM; `ferry status --qmp {q}` shows it, \
         and QMP migrate_cancel on {q} stops it",
        q = qmp.display()
    );
    let interactive = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
    if interactive {
        let answer = match bar {
            Some(b) => b.suspend(ask_cancel),
            None => ask_cancel(),
        };
        match answer.as_str() {
            "y" | "yes" => {}
            "d" | "detach" => {
                say(&goes_on);
                return Interrupt::Leave;
            }
            _ => {
                say("ferry: following the migration; Ctrl-C asks again");
                return Interrupt::Follow;
            }
        }
    } else {
        say("ferry: interrupted: cancelling the migration (Ctrl-C again leaves it running)");
    }
    match c.execute("migrate_cancel", Value::Null) {
        Ok(_) => say("ferry: cancel taken: the guest stays at the source; waiting for the migration to wind down"),
        Err(e) => say(&format!(
            "ferry: {}; following it to the end",
            super::chain(&e)
        )),
    }
    Interrupt::Follow
}

fn ask_cancel() -> String {
    use std::io::Write;
    eprint!("\nCancel the migration? The guest stays at the source unless the switchover has committed. [y]es / [N]o, keep following / [d]etach, leave it running: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    INTERRUPTED.store(false, Ordering::SeqCst);
    line.trim().to_ascii_lowercase()
}

pub fn main(args: MigrateArgs) -> CliResult {
    let mut c = connect(&args.qmp)?;
    if args.compression == Some(CompressionArg::Zstd) {
        let channels = match args.channels {
            Some(n) => n > 0,
            None => multifd_on(&mut c)?,
        };
        if !channels {
            return Err(CliError::msg(
                "--compression zstd compresses pages on the data channels, and this migration \
                 sends them on the main channel; add --channels N (1 to 16)",
            ));
        }
    }
    let mut params = serde_json::Map::new();
    if args.tls {
        let p = c.execute("query-migrate-parameters", Value::Null)?;
        if p["tls-creds"].as_str().unwrap_or("").is_empty() {
            return Err(CliError::msg(format!(
                "--tls: the VM at {} has no TLS credentials; start it with ferry run \
                 --tls-creds DIR, or set them with QMP migrate-set-parameters tls-creds",
                args.qmp.display()
            )));
        }
    }
    if let Some(h) = &args.tls_hostname {
        params.insert("tls-hostname".into(), json!(h));
    }
    if let Some(d) = args.downtime_limit {
        params.insert("downtime-limit".into(), json!(d));
    }
    if let Some(b) = args.max_bandwidth {
        params.insert("max-bandwidth".into(), json!(b));
    }
    if let Some(n) = args.channels.filter(|&n| n > 0) {
        params.insert("multifd-channels".into(), json!(n));
    }
    if let Some(m) = args.compression {
        params.insert("multifd-compression".into(), json!(m.as_str()));
    }
    if !params.is_empty() {
        c.execute("migrate-set-parameters", Value::Object(params))?;
    }
    // QEMU's switch between data channels and the main channel.
    if let Some(n) = args.channels {
        c.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "multifd", "state": n > 0 }] }),
        )?;
    }
    // Open the report file now, so a bad path fails before the guest moves rather
    // than after; and read the limits the source works against, for the page.
    let report = match &args.report {
        Some(path) => Some(Report::create(
            path,
            c.execute("query-migrate-parameters", Value::Null)?,
        )?),
        None => None,
    };
    // The guest's pace before the migration, to measure its pace during it against.
    // A report shows what the migration cost the guest, so it waits a second for the
    // baseline by default; a plain migration starts at once unless asked.
    let baseline = args
        .baseline
        .unwrap_or(if args.report.is_some() { 1.0 } else { 0.0 });
    let mut watch = (!args.detach).then(|| Watch::baseline(&mut c, baseline));
    let started = c
        .execute("migrate", json!({ "uri": args.uri }))
        .map_err(CliError::from);
    if args.detach {
        return started.map(|_| ExitCode::SUCCESS);
    }
    catch_interrupt();
    let followed =
        started.and_then(|_| follow_with(&mut c, args.json, None, Some(&args.qmp), watch.as_mut()));
    let info = match followed {
        Ok(info) => info,
        Err(e) => {
            // No migration to report on, or no way to learn how it ended.
            if let Some(r) = report {
                r.discard();
            }
            return Err(e);
        }
    };
    let progress = watch.map(|w| w.finish(&info, args.dest_qmp.as_deref()));
    let code = finish(&info, args.json, progress.as_ref())?;
    if let Some(r) = report {
        r.write(&info, &args.uri, progress)?;
    }
    Ok(code)
}

/// How long the guest is read at the destination after the migration.
const AFTER: Duration = Duration::from_secs(1);
/// How often the guest is read outside the migration; during it, at every poll.
const READ_EVERY: Duration = Duration::from_millis(100);
/// The shortest time between two readings during the migration, ms.
const MIN_INTERVAL_MS: f64 = 50.0;

/// The guest's pass counters summed over its vCPUs (`x-ferry-guest`), with the
/// throttle `info` says is in force.
fn read_guest(c: &mut QmpClient, info: Option<&MigrationInfo>) -> Result<(u64, u8, bool), String> {
    let g = c.execute("x-ferry-guest", Value::Null).map_err(|e| {
        format!(
            "the VM does not report its guest's passes: {}",
            super::chain(&e)
        )
    })?;
    let passes = g["passes"]
        .as_array()
        .and_then(|a| a.iter().map(Value::as_u64).sum::<Option<u64>>())
        .ok_or_else(|| format!("the VM reports no pass counters: {g}"))?;
    let throttle = info.and_then(|i| i.cpu_throttle_percentage).unwrap_or(0);
    let limited = info.is_some_and(|i| i.dirty_limit_throttle_time_per_round.is_some());
    Ok((passes, throttle, limited))
}

/// The guest's pass counters read before, during and after the migration, for the
/// guest's side of its cost. Reading is best effort: a VM that cannot say (an older
/// release) gets its migration all the same, and the summary says why it has no rates.
struct Watch {
    /// The migration's start: the last reading before the `migrate` command.
    start: Instant,
    before: Vec<Sample>,
    during: Vec<Sample>,
    before_note: Option<String>,
    broken: Option<String>,
}

impl Watch {
    /// Reads the guest every 100 ms for `secs` (at least once: the migration's start).
    fn baseline(c: &mut QmpClient, secs: f64) -> Self {
        let until = Instant::now() + Duration::from_secs_f64(secs);
        let mut readings = Vec::new();
        let mut broken = None;
        loop {
            match read_guest(c, None) {
                Ok((passes, ..)) => readings.push((Instant::now(), passes)),
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            }
            if Instant::now() >= until {
                break;
            }
            std::thread::sleep(READ_EVERY.min(until.saturating_duration_since(Instant::now())));
        }
        let start = readings.last().map_or_else(Instant::now, |r| r.0);
        let before: Vec<Sample> = readings
            .iter()
            .map(|&(at, passes)| Sample {
                t_ms: -(start - at).as_secs_f64() * 1e3,
                passes,
                ..Sample::default()
            })
            .collect();
        let during = before.last().copied().into_iter().collect();
        Watch {
            start,
            before: if secs > 0.0 { before } else { Vec::new() },
            during,
            before_note: (secs <= 0.0).then(|| "give --baseline SECS".to_string()),
            broken,
        }
    }

    /// Milliseconds since the migration's start.
    fn now_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e3
    }

    /// One reading during the migration, with the throttle `info` shows.
    fn during(&mut self, c: &mut QmpClient, info: &MigrationInfo) {
        if self.broken.is_some() {
            return;
        }
        let t_ms = self.now_ms();
        let last = self.during.last().map_or(f64::MIN, |s| s.t_ms);
        let finished = info.status.is_finished();
        // A rate over a few milliseconds is noise (the first poll comes right after the
        // start): such a reading is skipped, or at the end takes the previous one's place.
        if t_ms - last < MIN_INTERVAL_MS {
            if !finished {
                return;
            }
            if self.during.len() > 1 {
                self.during.pop();
            }
        }
        match read_guest(c, Some(info)) {
            Ok((passes, throttle_pct, dirty_limited)) => self.during.push(Sample {
                t_ms,
                passes,
                throttle_pct,
                dirty_limited,
            }),
            Err(e) => self.broken = Some(e),
        }
    }

    /// Reads the guest at the destination once it runs there, every 100 ms for [`AFTER`].
    fn after(&self, dest: &std::path::Path) -> Result<Vec<Sample>, String> {
        let mut d = QmpClient::connect(dest).map_err(|e| {
            format!(
                "cannot reach the destination at {}: {}",
                dest.display(),
                super::chain(&e)
            )
        })?;
        // The destination says `running` a moment after the source hears `completed`.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = d
                .execute("query-status", Value::Null)
                .map_err(|e| format!("the destination: {}", super::chain(&e)))?;
            if st["status"] == "running" {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the destination is {}, not running",
                    st["status"].as_str().unwrap_or("in an unknown state")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let until = Instant::now() + AFTER;
        let mut out = Vec::new();
        loop {
            let (passes, ..) = read_guest(&mut d, None)?;
            out.push(Sample {
                t_ms: self.now_ms(),
                passes,
                ..Sample::default()
            });
            if Instant::now() >= until {
                return Ok(out);
            }
            std::thread::sleep(READ_EVERY);
        }
    }

    /// The readings as rates, with the destination's read now when `dest` is given.
    fn finish(self, info: &MigrationInfo, dest: Option<&std::path::Path>) -> GuestProgress {
        if let Some(why) = self.broken {
            return GuestProgress {
                unmeasured: Some(why),
                ..GuestProgress::default()
            };
        }
        let completed = info.status == MigrationStatus::Completed;
        let (after, after_note) = match dest {
            _ if !completed => (Vec::new(), Some("the guest did not move".to_string())),
            None => (Vec::new(), Some("give --dest-qmp".to_string())),
            Some(d) => match self.after(d) {
                Ok(s) => (s, None),
                Err(e) => (Vec::new(), Some(e)),
            },
        };
        GuestProgress {
            // The guest ran at the source for the total time less the downtime.
            live_ms: completed
                .then(|| info.total_time.saturating_sub(info.downtime.unwrap_or(0)) as f64),
            before: self.before,
            during: self.during,
            after,
            unmeasured: None,
            before_note: self.before_note,
            after_note,
        }
    }
}

/// The file `ferry migrate --report` writes when the migration ends.
struct Report {
    path: PathBuf,
    file: std::fs::File,
    limits: Value,
}

impl Report {
    fn create(path: &std::path::Path, limits: Value) -> Result<Self, CliError> {
        let file = std::fs::File::create(path).map_err(|e| CliError::Io {
            what: format!("cannot create the report file {}", path.display()),
            source: e,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            limits,
        })
    }

    /// Removes the (still empty) file when there is nothing to report.
    fn discard(self) {
        drop(self.file);
        let _ = std::fs::remove_file(&self.path);
    }

    fn write(
        mut self,
        info: &MigrationInfo,
        uri: &str,
        guest: Option<GuestProgress>,
    ) -> Result<(), CliError> {
        use std::io::Write;
        let ctx = ReportContext {
            uri: Some(uri.to_string()),
            downtime_limit_ms: self.limits["downtime-limit"].as_u64(),
            max_bandwidth: self.limits["max-bandwidth"].as_u64(),
            finished_at: Some(report::utc_timestamp(std::time::SystemTime::now())),
            guest,
        };
        self.file
            .write_all(report::render(info, &ctx).as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| CliError::Io {
                what: format!("cannot write the report to {}", self.path.display()),
                source: e,
            })?;
        eprintln!("ferry: report written to {}", self.path.display());
        Ok(())
    }
}

/// Polls `query-migrate` until the migration ends, showing progress. With
/// `escalate_from` (the downtime limit in ms), a migration that has not converged after
/// 10 s gets its downtime limit doubled every 5 s, as management software does for
/// guests that dirty memory faster than it moves.
pub fn follow(
    c: &mut QmpClient,
    json_lines: bool,
    escalate_from: Option<u64>,
) -> Result<MigrationInfo, CliError> {
    follow_with(c, json_lines, escalate_from, None, None)
}

/// [`follow`], with Ctrl-C handled as [`on_interrupt`] says when `interruptible` names
/// the VM's socket, and the guest read at every poll into `watch`.
fn follow_with(
    c: &mut QmpClient,
    json_lines: bool,
    escalate_from: Option<u64>,
    interruptible: Option<&std::path::Path>,
    mut watch: Option<&mut Watch>,
) -> Result<MigrationInfo, CliError> {
    let mut interrupts = 0;
    let mut limit = escalate_from.unwrap_or(0);
    let mut next_escalation = Duration::from_secs(10);
    let bar = (!json_lines && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new_spinner();
        b.set_style(
            ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("static template"),
        );
        b.enable_steady_tick(Duration::from_millis(100));
        b
    });
    let start = Instant::now();
    let mut last_line = Instant::now() - Duration::from_secs(10);
    loop {
        let info = query_migrate(c)?;
        if let Some(w) = watch.as_deref_mut() {
            w.during(c, &info);
        }
        if json_lines {
            println!("{}", serde_json::to_string(&info).unwrap_or_default());
        } else {
            let line = progress_line(&info);
            match &bar {
                Some(b) => b.set_message(line),
                None if last_line.elapsed() >= Duration::from_secs(1) => {
                    eprintln!("{:>6.1}s {line}", start.elapsed().as_secs_f64());
                    last_line = Instant::now();
                }
                None => {}
            }
        }
        if info.status.is_finished() {
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            return Ok(info);
        }
        if let Some(qmp) = interruptible.filter(|_| INTERRUPTED.swap(false, Ordering::SeqCst)) {
            interrupts += 1;
            let interactive = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
            let leave = if interrupts > 1 && !interactive {
                eprintln!(
                    "ferry: the migration goes on in the VM; `ferry status --qmp {}` shows it",
                    qmp.display()
                );
                true
            } else {
                matches!(on_interrupt(c, qmp, bar.as_ref()), Interrupt::Leave)
            };
            if leave {
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
                return Err(CliError::msg(
                    "left while the migration goes on (Ctrl-C); it was not cancelled",
                ));
            }
        }
        if escalate_from.is_some()
            && info.status == MigrationStatus::Active
            && start.elapsed() >= next_escalation
        {
            limit = (limit * 2).max(1);
            c.execute("migrate-set-parameters", json!({ "downtime-limit": limit }))?;
            let note =
                format!("not converging at this dirty rate: downtime limit raised to {limit} ms");
            match &bar {
                Some(b) => b.println(note),
                None if !json_lines => eprintln!("{note}"),
                None => {}
            }
            next_escalation += Duration::from_secs(5);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn progress_line(i: &MigrationInfo) -> String {
    let pass = i.passes.len();
    let bw = i.passes.last().map_or(0.0, |p| p.throughput_bytes_per_sec);
    let over = match &i.multifd {
        Some(m) => format!(" over {}", plural(m.channels.into(), "channel")),
        None => String::new(),
    };
    let waiting: Vec<String> = i
        .devices
        .iter()
        .filter(|d| d.mode == "precopy" && d.acked_ms.is_none())
        .map(|d| {
            if d.instance == 0 {
                d.name.clone()
            } else {
                format!("{}{}", d.name, d.instance)
            }
        })
        .collect();
    let waiting = if waiting.is_empty() || i.status != MigrationStatus::Active {
        String::new()
    } else {
        format!(", awaiting acknowledgement of {}", waiting.join(", "))
    };
    let throttle = match (
        i.cpu_throttle_percentage,
        i.dirty_limit_throttle_time_per_round,
    ) {
        (Some(p), _) if p > 0 => format!(", vCPUs throttled {p}%"),
        (_, Some(_)) => ", dirty-limit on".to_string(),
        _ => String::new(),
    };
    let stall = match i.convergence.as_ref().and_then(|c| c.why.as_ref()) {
        Some(why) if i.status == MigrationStatus::Active => format!(" - not converging: {why}"),
        _ => String::new(),
    };
    format!(
        "{}: pass {pass}{over}, {} sent, {} remaining, {}/s, expected downtime {} ms{waiting}{throttle}{stall}",
        i.status.as_str(),
        human_bytes(i.ram.transferred),
        human_bytes(i.ram.remaining),
        human_bytes(bw as u64),
        i.expected_downtime
    )
}

/// The final word on a migration: a summary, or the JSON object; with the guest's
/// progress, a `guest:` line in the summary and `guest-progress` in the JSON object.
fn finish(info: &MigrationInfo, json_out: bool, guest: Option<&GuestProgress>) -> CliResult {
    if json_out {
        println!("{}", final_json(info, guest));
    } else {
        print!("{}", summary_with(info, guest));
    }
    Ok(if info.status == MigrationStatus::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The final JSON object: `query-migrate`'s, with `guest-progress` when the guest was read.
fn final_json(info: &MigrationInfo, guest: Option<&GuestProgress>) -> String {
    let mut v = serde_json::to_value(info).unwrap_or_default();
    if let (Some(g), Some(o)) = (guest, v.as_object_mut()) {
        o.insert("guest-progress".into(), g.to_json());
    }
    v.to_string()
}

/// A human summary of a finished migration.
pub fn summary(i: &MigrationInfo) -> String {
    summary_with(i, None)
}

/// [`summary`], with a line on the guest's pass rate before, during and after.
fn summary_with(i: &MigrationInfo, guest: Option<&GuestProgress>) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "migration {}", i.status.as_str());
    if let Some(e) = &i.error_desc {
        let _ = writeln!(s, "  error:        {e}");
    }
    let _ = writeln!(
        s,
        "  total time:   {} ms (setup {} ms)",
        i.total_time, i.setup_time
    );
    if let Some(d) = i.downtime {
        let _ = writeln!(s, "  downtime:     {d} ms");
    }
    if let Some(c) = &i.convergence {
        if c.forced_switchover {
            let _ = writeln!(
                s,
                "  converged:    no; switched over at the timeout ({} s), accepting the downtime",
                c.timeout
            );
        } else if let Some(why) = &c.why {
            let _ = writeln!(s, "  converging:   no: {why}");
        }
        if let Some(e) = &c.throttle_error {
            let _ = writeln!(s, "  throttle:     wanted, but {e}");
        }
    }
    let peak = i
        .passes
        .iter()
        .map(|p| p.cpu_throttle_percent)
        .max()
        .unwrap_or(0);
    if peak > 0 {
        let steps: Vec<String> = i
            .passes
            .iter()
            .filter(|p| !p.final_pass)
            .map(|p| format!("{}%", p.cpu_throttle_percent))
            .collect();
        let _ = writeln!(
            s,
            "  auto-converge: vCPUs throttled up to {peak}% (per pass: {})",
            steps.join(" ")
        );
    }
    if i.passes.iter().any(|p| p.dirty_limited) {
        let held: u64 = i.passes.iter().map(|p| p.throttle_us).max().unwrap_or(0);
        let _ = writeln!(
            s,
            "  dirty-limit:  on from pass {}; a vCPU held back up to {:.1} ms in one pass",
            i.passes.iter().position(|p| p.dirty_limited).unwrap_or(0),
            held as f64 / 1e3
        );
    }
    if let Some(g) = guest {
        let _ = writeln!(s, "  guest:        {}", g.summary_line());
    }
    let secs = (i.total_time as f64 / 1e3).max(1e-3);
    let _ = writeln!(
        s,
        "  transferred:  {} ({}/s average) of {} guest RAM",
        human_bytes(i.ram.transferred),
        human_bytes((i.ram.transferred as f64 / secs) as u64),
        human_bytes(i.ram.total)
    );
    let _ = writeln!(
        s,
        "  pages:        {} with data, {} zero (sent as a flag)",
        i.ram.normal, i.ram.duplicate
    );
    if let Some(line) = channels_line(i) {
        let _ = writeln!(s, "  channels:     {line}");
    }
    if let Some(m) = i.multifd.as_ref().filter(|m| m.per_channel.len() > 1) {
        let each: Vec<String> = m.per_channel.iter().map(|c| human_bytes(c.bytes)).collect();
        let _ = writeln!(s, "  per channel:  {}", each.join(", "));
    }
    if let Some(m) = i.multifd.as_ref().filter(|m| !m.strays.is_empty()) {
        let _ = writeln!(
            s,
            "  turned away:  {}: {}",
            plural(m.strays.len() as u64, "connection"),
            m.strays.join("; ")
        );
    }
    if let Some(v) = &i.verified {
        match &i.state_verified {
            Some(st) => {
                let _ = writeln!(s, "  verified:     memory {v}, device and vCPU state {st}");
            }
            None => {
                let _ = writeln!(s, "  verified:     {v}");
            }
        }
    }
    for (n, d) in i.devices.iter().filter(|d| worth_showing(d)).enumerate() {
        let _ = writeln!(
            s,
            "  {:<14}{}",
            if n == 0 { "devices:" } else { "" },
            device_line(d)
        );
    }
    if !i.passes.is_empty() {
        let _ = writeln!(s, "  passes:");
        for p in &i.passes {
            let _ = writeln!(
                s,
                "    {:>3}{} {:>9} pages {:>10} {:>9.1} ms {:>11}/s  dirty after {:>7}",
                p.pass,
                if p.final_pass { "*" } else { " " },
                p.pages,
                human_bytes(p.bytes),
                p.duration_ms,
                human_bytes(p.throughput_bytes_per_sec as u64),
                p.dirty_after
            );
        }
        let _ = writeln!(s, "    (* = with the guest stopped)");
    }
    if let Some(b) = &i.downtime_breakdown {
        let _ = writeln!(
            s,
            "  downtime:     stop {:.2} ms, final pass {:.2} ms, devices {:.2} ms, vCPUs {:.2} ms, verify {:.2} ms, switchover {:.2} ms (destination resume {:.2} ms)",
            b.stop_ms, b.final_pass_ms, b.devices_ms, b.vcpus_ms, b.verify_ms, b.switchover_ms, b.destination_resume_ms
        );
    }
    s
}

/// Whether a device belongs in the summary: one that precopies, could have on one host,
/// or carries state of some size. A console with a few bytes that neither host could
/// precopy is not news.
fn worth_showing(d: &DeviceStats) -> bool {
    d.mode == "precopy"
        || d.precopy_capable
        || d.reason
            .as_deref()
            .is_some_and(|r| !r.starts_with("neither host"))
        || d.stop_copy_bytes >= 1 << 20
        || d.pending_stop_copy >= 1 << 20
}

/// `accel: precopy, acknowledged after 310 ms; 256.0 MiB before the switchover, 1.2 MiB
/// after` or `accel1: stop-copy: the destination host cannot precopy it; 64.0 MiB at the
/// switchover`.
fn device_line(d: &DeviceStats) -> String {
    let mut line = d.describe();
    if d.mode == "precopy" {
        line.push_str(&format!(
            "; {} before the switchover, {} after",
            human_bytes(d.precopy_bytes),
            human_bytes(d.final_precopy_bytes + d.stop_copy_bytes)
        ));
    } else if d.stop_copy_bytes > 0 {
        line.push_str(&format!(
            "; {} at the switchover",
            human_bytes(d.stop_copy_bytes)
        ));
    }
    line
}

/// How the pages travelled: over how many data channels, compressed how, or on the
/// main channel. None before any page moved.
fn channels_line(i: &MigrationInfo) -> Option<String> {
    let Some(m) = &i.multifd else {
        let moved = i.ram.normal + i.ram.duplicate > 0;
        return moved.then(|| "pages on the main channel (no data channels)".to_string());
    };
    let over = plural(m.channels.into(), "data channel");
    Some(match m.compression.as_str() {
        "none" => format!("{over}, uncompressed: {} sent", human_bytes(m.wire_bytes)),
        method => format!(
            "{over}, {method}: {} of page data sent as {}",
            human_bytes(m.raw_bytes),
            human_bytes(m.wire_bytes)
        ),
    })
}

/// `1 channel`, `4 channels`.
fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

pub fn status(args: StatusArgs) -> CliResult {
    let mut c = connect(&args.qmp)?;
    let st = c.execute("query-status", Value::Null)?;
    let guest = c.execute("x-ferry-guest", Value::Null)?;
    let mig = c.execute("query-migrate", Value::Null)?;
    if args.json {
        println!(
            "{}",
            json!({ "status": st, "guest": guest, "migration": mig })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("VM: {}", st["status"].as_str().unwrap_or("unknown"));
    println!(
        "guest: passes {}",
        guest["passes"]
            .as_array()
            .map(|a| a
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default()
    );
    if mig.as_object().is_some_and(|m| !m.is_empty()) {
        let info: MigrationInfo = serde_json::from_value(mig)
            .map_err(|e| CliError::msg(format!("unexpected query-migrate reply: {e}")))?;
        if info.handover == Handover::InDoubt {
            println!("handover: IN DOUBT: {}", ferry_vmm::vmm::IN_DOUBT_ADVICE);
        }
        if info.status.is_finished() {
            print!("last {}", summary(&info));
        } else {
            println!("migration: {}", progress_line(&info));
        }
    } else {
        println!("migration: none yet");
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry reclaim`: QMP `x-ferry-reclaim`, with what it did.
pub fn reclaim(args: StatusArgs) -> CliResult {
    let mut c = connect(&args.qmp)?;
    c.execute("x-ferry-reclaim", Value::Null)?;
    let st = c.execute("query-status", Value::Null)?;
    let state = st["status"].as_str().unwrap_or("unknown").to_string();
    if args.json {
        println!("{}", json!({ "reclaimed": true, "status": state }));
    } else {
        println!("guest taken back; the VM is {state}");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use ferry_migration::engine::stats::{ChannelStats, MultifdStats};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        migrate: MigrateArgs,
    }

    fn parse(args: &[&str]) -> Result<MigrateArgs, clap::Error> {
        Cli::try_parse_from(
            ["ferry", "--qmp", "/tmp/s.sock", "unix:/tmp/m"]
                .iter()
                .chain(args),
        )
        .map(|c| c.migrate)
    }

    #[test]
    fn channels_and_compression_options() {
        let a = parse(&[]).unwrap();
        assert_eq!((a.channels, a.compression), (None, None));
        let a = parse(&["--channels", "4", "--compression", "zstd"]).unwrap();
        assert_eq!(a.channels, Some(4));
        assert_eq!(a.compression, Some(CompressionArg::Zstd));
        assert_eq!(parse(&["--channels", "0"]).unwrap().channels, Some(0));
        assert_eq!(parse(&["--channels", "16"]).unwrap().channels, Some(16));
        let e = parse(&["--channels", "17"]).unwrap_err().to_string();
        assert!(e.contains("17") && e.contains("0..=16"), "{e}");
        let e = parse(&["--compression", "zlib"]).unwrap_err().to_string();
        assert!(e.contains("zlib") && e.contains("none, zstd"), "{e}");
    }

    fn moved(multifd: Option<MultifdStats>) -> MigrationInfo {
        let mut i = MigrationInfo {
            status: MigrationStatus::Completed,
            multifd,
            ..MigrationInfo::default()
        };
        i.ram.normal = 300_000;
        i
    }

    fn four_channels_zstd() -> MultifdStats {
        MultifdStats {
            channels: 4,
            compression: "zstd".into(),
            per_channel: [80, 81, 79, 70]
                .iter()
                .map(|mib| ChannelStats {
                    bytes: mib << 20,
                    ..ChannelStats::default()
                })
                .collect(),
            raw_bytes: 1288 << 20,
            wire_bytes: 310 << 20,
            ..MultifdStats::default()
        }
    }

    #[test]
    fn the_summary_says_how_the_pages_travelled() {
        let s = summary(&moved(Some(four_channels_zstd())));
        assert!(
            s.contains(
                "  channels:     4 data channels, zstd: 1.3 GiB of page data sent as 310.0 MiB\n"
            ),
            "{s}"
        );
        assert!(
            s.contains("  per channel:  80.0 MiB, 81.0 MiB, 79.0 MiB, 70.0 MiB\n"),
            "{s}"
        );

        let one = MultifdStats {
            channels: 1,
            compression: "none".into(),
            per_channel: vec![ChannelStats::default()],
            wire_bytes: 3 << 30,
            ..MultifdStats::default()
        };
        let s = summary(&moved(Some(one)));
        assert!(
            s.contains("  channels:     1 data channel, uncompressed: 3.0 GiB sent\n"),
            "{s}"
        );
        assert!(!s.contains("per channel"), "{s}");

        let s = summary(&moved(None));
        assert!(
            s.contains("  channels:     pages on the main channel (no data channels)\n"),
            "{s}"
        );
        // A migration refused before any page moved says nothing of channels.
        let refused = MigrationInfo {
            status: MigrationStatus::Failed,
            ..MigrationInfo::default()
        };
        assert!(!summary(&refused).contains("channels"));
    }

    #[test]
    fn the_summary_names_connections_the_destination_turned_away() {
        let m = MultifdStats {
            strays: vec!["127.0.0.1:5555: not a ferry channel".into()],
            ..four_channels_zstd()
        };
        let s = summary(&moved(Some(m)));
        assert!(
            s.contains("  turned away:  1 connection: 127.0.0.1:5555: not a ferry channel\n"),
            "{s}"
        );
    }

    #[test]
    fn baseline_and_destination_options() {
        let a = parse(&[]).unwrap();
        assert_eq!((a.baseline, a.dest_qmp), (None, None));
        let a = parse(&["--baseline", "0", "--dest-qmp", "unix:/tmp/d.sock"]).unwrap();
        assert_eq!(a.baseline, Some(0.0));
        assert_eq!(a.dest_qmp, Some(PathBuf::from("/tmp/d.sock")));
        assert_eq!(parse(&["--baseline", "2.5"]).unwrap().baseline, Some(2.5));
        let e = parse(&["--detach", "--dest-qmp", "/tmp/d.sock"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be used with"), "{e}");
        for bad in ["-1", "soon", "NaN"] {
            let e = parse(&[&format!("--baseline={bad}")])
                .unwrap_err()
                .to_string();
            assert!(e.contains("seconds from 0 to 3600"), "{e}");
        }
    }

    /// 400 passes/s before; 200/s for 1.9 s running during, throttled 20% then 40%;
    /// 400/s after.
    fn progress() -> GuestProgress {
        let s = |t_ms: f64, passes: u64, throttle_pct: u8| Sample {
            t_ms,
            passes,
            throttle_pct,
            dirty_limited: false,
        };
        let before: Vec<Sample> = (0..=10u32)
            .map(|i| s(-1000.0 + 100.0 * f64::from(i), 40 * u64::from(i), 0))
            .collect();
        let mut during = vec![before[10]];
        during.push(s(1000.0, 600, 20));
        during.push(s(1900.0, 780, 40));
        during.push(s(2000.0, 780, 40));
        let after = vec![s(2200.0, 780, 0), s(3200.0, 1180, 0)];
        GuestProgress {
            before,
            during,
            live_ms: Some(1900.0),
            after,
            ..GuestProgress::default()
        }
    }

    #[test]
    fn the_summary_gives_the_guest_rate_before_during_and_after() {
        let i = moved(None);
        let s = summary_with(&i, Some(&progress()));
        assert!(
            s.contains(
                "  guest:        400 passes/s before, 200/s during (50% of before), 400/s after\n"
            ),
            "{s}"
        );
        let g = GuestProgress {
            after: Vec::new(),
            after_note: Some("give --dest-qmp".into()),
            ..progress()
        };
        let s = summary_with(&i, Some(&g));
        assert!(
            s.contains(
                "  guest:        400 passes/s before, 200/s during (50% of before), after: not measured (give --dest-qmp)\n"
            ),
            "{s}"
        );
        // `ferry status` has no readings, and no line for them.
        assert!(!summary(&i).contains("guest:"));
    }

    #[test]
    fn the_json_object_carries_the_guest_progress() {
        let i = moved(None);
        let v: Value = serde_json::from_str(&final_json(&i, Some(&progress()))).unwrap();
        assert_eq!(v["status"], "completed");
        let g = &v["guest-progress"];
        assert_eq!(g["before"], 400.0);
        assert_eq!(g["during"], 200.0);
        assert_eq!(g["during-share"], 50.0);
        assert_eq!(g["after"], 400.0);
        assert_eq!(g["samples"][10], json!([1000, 200.0, 20, false]));
        assert_eq!(g["samples"][11], json!([1900, 200.0, 40, false]));
        assert_eq!(g["samples"][12], json!([2000, 0.0, 40, false]));
        assert_eq!(g["samples"][13], json!([3200, 400.0, 0, false]));
        let v: Value = serde_json::from_str(&final_json(&i, None)).unwrap();
        assert!(v.get("guest-progress").is_none());
    }

    #[test]
    fn the_progress_line_shows_the_channel_count() {
        let mut i = moved(Some(four_channels_zstd()));
        i.status = MigrationStatus::Active;
        assert!(
            progress_line(&i).starts_with("active: pass 0 over 4 channels, "),
            "{}",
            progress_line(&i)
        );
        i.multifd = None;
        assert!(progress_line(&i).starts_with("active: pass 0, "));
    }
}
