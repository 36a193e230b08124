//! `ferry migrate` and `ferry status`: QMP clients of a running `ferry run`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use ferry_migration::engine::{human_bytes, MigrationInfo, MigrationStatus};
use ferry_vmm::qmp::QmpClient;
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
    /// Print one JSON object per update instead of a progress bar
    #[arg(long)]
    pub json: bool,
    /// Start the migration and return at once
    #[arg(long, conflicts_with = "report")]
    pub detach: bool,
    /// When the migration ends, write an HTML report of it (timeline, downtime breakdown) to FILE
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
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

/// Reads `query-migrate` into the engine's type.
pub fn query_migrate(c: &mut QmpClient) -> Result<MigrationInfo, CliError> {
    let v = c.execute("query-migrate", Value::Null)?;
    serde_json::from_value(v)
        .map_err(|e| CliError::msg(format!("unexpected query-migrate reply: {e}")))
}

pub fn main(args: MigrateArgs) -> CliResult {
    let mut c = connect(&args.qmp)?;
    let mut params = serde_json::Map::new();
    if let Some(d) = args.downtime_limit {
        params.insert("downtime-limit".into(), json!(d));
    }
    if let Some(b) = args.max_bandwidth {
        params.insert("max-bandwidth".into(), json!(b));
    }
    if !params.is_empty() {
        c.execute("migrate-set-parameters", Value::Object(params))?;
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
    let started = c
        .execute("migrate", json!({ "uri": args.uri }))
        .map_err(CliError::from);
    if args.detach {
        return started.map(|_| ExitCode::SUCCESS);
    }
    let info = match started.and_then(|_| follow(&mut c, args.json, None)) {
        Ok(info) => info,
        Err(e) => {
            // No migration to report on, or no way to learn how it ended.
            if let Some(r) = report {
                r.discard();
            }
            return Err(e);
        }
    };
    let code = finish(&info, args.json)?;
    if let Some(r) = report {
        r.write(&info, &args.uri)?;
    }
    Ok(code)
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

    fn write(mut self, info: &MigrationInfo, uri: &str) -> Result<(), CliError> {
        use std::io::Write;
        let ctx = ReportContext {
            uri: Some(uri.to_string()),
            downtime_limit_ms: self.limits["downtime-limit"].as_u64(),
            max_bandwidth: self.limits["max-bandwidth"].as_u64(),
            finished_at: Some(report::utc_timestamp(std::time::SystemTime::now())),
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
    format!(
        "{}: pass {pass}, {} sent, {} remaining, {}/s, expected downtime {} ms",
        i.status.as_str(),
        human_bytes(i.ram.transferred),
        human_bytes(i.ram.remaining),
        human_bytes(bw as u64),
        i.expected_downtime
    )
}

/// The final word on a migration: a summary, or the JSON object.
pub fn finish(info: &MigrationInfo, json_out: bool) -> CliResult {
    if json_out {
        println!("{}", serde_json::to_string(info).unwrap_or_default());
    } else {
        print!("{}", summary(info));
    }
    Ok(if info.status == MigrationStatus::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A human summary of a finished migration.
pub fn summary(i: &MigrationInfo) -> String {
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
    if let Some(v) = &i.verified {
        let _ = writeln!(s, "  verified:     {v}");
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
