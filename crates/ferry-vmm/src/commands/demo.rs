//! `ferry demo`: two real `ferry run` processes on this machine, a live migration of a
//! running guest between them over TCP, and a check that nothing was lost.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use ferry_migration::engine::{human_bytes, MigrationStatus};
use ferry_vmm::qmp::QmpClient;
use serde_json::{json, Value};

use super::migrate::{follow, summary};
use super::run::BackendArg;
use super::{parse_size, CliError, CliResult};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Hypervisor backend of both VMs
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendArg,
    /// Guest RAM
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    pub mem: u64,
    /// RAM the guest dirties each pass
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub dirty: u64,
    /// Longest guest pause to aim for, in milliseconds
    #[arg(long, default_value_t = 300)]
    pub downtime_limit: u64,
    /// How long the guest runs before it migrates, in seconds
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Print one JSON object with everything instead of text
    #[arg(long)]
    pub json: bool,
}

/// The two child processes; killed if the demo stops early.
struct Vms {
    dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Vms {
    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for Vms {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            if matches!(c.try_wait(), Ok(None)) {
                let deadline = Instant::now() + Duration::from_secs(3);
                while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn(vms: &mut Vms, name: &str, args: &[String]) -> Result<(), CliError> {
    let exe = std::env::current_exe().map_err(|e| CliError::Io {
        what: "cannot find the ferry executable".into(),
        source: e,
    })?;
    let log =
        std::fs::File::create(vms.dir.join(format!("{name}.log"))).map_err(|e| CliError::Io {
            what: "cannot create a log file".into(),
            source: e,
        })?;
    let child = Command::new(exe)
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| CliError::Io {
            what: format!("cannot start the {name} VM"),
            source: e,
        })?;
    vms.children.push((name.to_string(), child));
    Ok(())
}

fn connect(vms: &Vms, name: &str, path: &Path) -> Result<QmpClient, CliError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match QmpClient::connect(path) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(CliError::msg(format!(
                    "the {name} VM did not come up: {}\n{}",
                    super::chain(&e),
                    vms.log(name)
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn passes(c: &mut QmpClient) -> Result<Vec<u64>, CliError> {
    let g = c.execute("x-ferry-guest", Value::Null)?;
    Ok(g["passes"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default())
}

pub fn main(args: DemoArgs) -> CliResult {
    let dir = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| CliError::Io {
        what: format!("cannot create {}", dir.display()),
        source: e,
    })?;
    let mut vms = Vms {
        dir: dir.clone(),
        children: Vec::new(),
    };
    let backend = match args.backend {
        BackendArg::Auto => "auto",
        BackendArg::Soft => "soft",
        BackendArg::Kvm => "kvm",
    };
    let common = vec![
        "--backend".to_string(),
        backend.to_string(),
        "--mem".into(),
        args.mem.to_string(),
        "--dirty".into(),
        args.dirty.to_string(),
    ];
    let (src_sock, dst_sock) = (dir.join("source.sock"), dir.join("destination.sock"));

    let mut dargs = common.clone();
    dargs.extend([
        "--incoming".into(),
        "tcp:127.0.0.1:0".into(),
        "--qmp".into(),
        dst_sock.display().to_string(),
    ]);
    spawn(&mut vms, "destination", &dargs)?;
    let out = vms.children[0].1.stdout.take().expect("piped");
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| CliError::Io {
            what: "cannot read from the destination VM".into(),
            source: e,
        })?;
    let Some(uri) = line
        .trim()
        .strip_prefix("listening for an incoming migration on ")
        .map(str::to_string)
    else {
        return Err(CliError::msg(format!(
            "the destination VM did not start listening:\n{}",
            vms.log("destination")
        )));
    };

    let mut sargs = common;
    sargs.extend([
        "--qmp".into(),
        src_sock.display().to_string(),
        "--global".into(),
        "migration.verify-full=on".into(),
        "--global".into(),
        format!("migration.downtime-limit={}", args.downtime_limit),
    ]);
    spawn(&mut vms, "source", &sargs)?;
    let mut src = connect(&vms, "source", &src_sock)?;
    let mut dst = connect(&vms, "destination", &dst_sock)?;
    let backend_used = vms.log("source").contains("kvm backend");
    if !args.json {
        eprintln!(
            "ferry demo: a {} guest on the {} backend dirtying {} per pass; destination waits on {uri}",
            human_bytes(args.mem),
            if backend_used { "kvm" } else { "soft" },
            human_bytes(args.dirty)
        );
    }
    std::thread::sleep(Duration::from_secs_f64(args.warmup.max(0.0)));
    let before = passes(&mut src)?;
    if !args.json {
        eprintln!("source guest at pass {before:?}; migrating…");
    }
    src.execute("migrate", json!({ "uri": uri }))?;
    let info = follow(&mut src, false, Some(args.downtime_limit))?;
    let src_state = src.execute("query-status", Value::Null)?;
    let mut checks = Vec::new();
    let mut ok = info.status == MigrationStatus::Completed;
    checks.push(json!({ "check": "migration completed", "ok": ok, "detail": info.error_desc }));
    let mut after = Vec::new();
    let mut verify = Value::Null;
    if ok {
        let src_final = passes(&mut src)?;
        // The destination's guest must carry on past where the source stopped.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            after = passes(&mut dst)?;
            // The destination reports `running` once its side of the migration has
            // wound down, a moment after the guest resumed.
            let running = dst.execute("query-status", Value::Null)?["status"] == "running";
            let ahead = running && after.iter().zip(&src_final).all(|(a, b)| a > b);
            if ahead || Instant::now() > deadline {
                checks.push(json!({
                    "check": "guest carries on at the destination",
                    "ok": ahead,
                    "detail": format!("source stopped at pass {src_final:?}, destination now at {after:?}"),
                }));
                ok &= ahead;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        verify = dst.execute("x-ferry-verify", Value::Null)?;
        let wrong = verify["pages-wrong"].as_u64().unwrap_or(u64::MAX);
        let checked = verify["pages-checked"].as_u64().unwrap_or(0);
        checks.push(json!({
            "check": "every page the guest dirties holds its pass value",
            "ok": wrong == 0 && checked > 0,
            "detail": format!("{checked} pages checked, {wrong} wrong"),
        }));
        ok &= wrong == 0 && checked > 0;
        let digest_ok = info.verified.as_deref() == Some("digest+full");
        checks.push(json!({
            "check": "destination verified the memory digest (incremental and full)",
            "ok": digest_ok,
            "detail": info.verified,
        }));
        ok &= digest_ok;
        let post = src_state["status"] == "postmigrate";
        checks.push(json!({ "check": "source VM stopped for good", "ok": post, "detail": src_state["status"] }));
        ok &= post;
    }
    let _ = src.execute("quit", Value::Null);
    let _ = dst.execute("quit", Value::Null);

    if args.json {
        println!(
            "{}",
            json!({
                "ok": ok,
                "backend": if backend_used { "kvm" } else { "soft" },
                "guest": { "ram": args.mem, "dirty": args.dirty, "passes-before": before, "passes-after": after },
                "migration": info,
                "verify": verify,
                "checks": checks,
            })
        );
    } else {
        print!("{}", summary(&info));
        println!("checks:");
        for c in &checks {
            println!(
                "  [{}] {}{}",
                if c["ok"] == true { "ok" } else { "FAILED" },
                c["check"].as_str().unwrap_or(""),
                c["detail"]
                    .as_str()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            );
        }
        if !ok {
            eprintln!(
                "--- source log ---\n{}--- destination log ---\n{}",
                vms.log("source"),
                vms.log("destination")
            );
        }
    }
    drop(vms);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
