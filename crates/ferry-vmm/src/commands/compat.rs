//! `ferry dump-vmstate` and `ferry compat-check`: what this release can migrate, and whether
//! two releases can migrate to each other.
//!
//! ```text
//! old-ferry dump-vmstate old.json
//! ferry dump-vmstate new.json
//! ferry compat-check old.json new.json
//! ```
//!
//! The dump format and the checks are the engine's (`ferry_migration::compat::schema` and
//! `::check`); this module reads and writes files and prints.
//!
//! `compat-check` exits 0 when the releases are compatible, 1 when it found breaking changes
//! (one line each), and 2 when a dump cannot be read, as `diff` and `cmp` do.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use ferry_migration::compat::check::{check, Finding};
use ferry_migration::compat::schema::{dump, VmStateDump};
use ferry_vmm::machine;
use serde_json::json;

use super::{chain, CliError, CliResult};

/// Version of the `--json` report's shape.
const REPORT_FORMAT: u32 = 1;
/// Exit status of `compat-check` when it found breaking changes.
const BREAKS_FOUND: u8 = 1;
/// Exit status of `compat-check` when a dump could not be read.
const UNREADABLE: u8 = 2;

#[derive(Debug, Args)]
pub struct DumpArgs {
    /// Where to write the JSON dump; `-` for standard output
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Dump of the older release (`ferry dump-vmstate` of that build)
    #[arg(value_name = "OLD.json")]
    pub old: PathBuf,
    /// Dump of the newer release
    #[arg(value_name = "NEW.json")]
    pub new: PathBuf,
    /// Print the findings as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn dump_vmstate(args: DumpArgs) -> CliResult {
    let schemas = machine::state_schemas();
    let dumped = dump(machine::RELEASE, &machine::registry(), &schemas)
        .map_err(|e| CliError::msg(format!("cannot dump this release: {}", chain(&e))))?;
    let text = dumped.to_json();
    if args.file.as_os_str() == "-" {
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::write(&args.file, text)
        .map_err(|e| CliError::msg(format!("cannot write {}: {e}", args.file.display())))?;
    println!(
        "wrote the vmstate of release {} to {}: {}, {}, {}",
        dumped.release,
        args.file.display(),
        count(dumped.machines.len(), "machine type"),
        count(dumped.drivers.len(), "driver"),
        count(dumped.devices.len(), "device state")
    );
    Ok(ExitCode::SUCCESS)
}

pub fn compat_check(args: CheckArgs) -> CliResult {
    let (old, new) = match (read_dump(&args.old), read_dump(&args.new)) {
        (Ok(old), Ok(new)) => (old, new),
        (old, new) => {
            for e in [old.err(), new.err()].into_iter().flatten() {
                eprintln!("ferry: {e}");
            }
            return Ok(ExitCode::from(UNREADABLE));
        }
    };
    let findings = check(&old, &new);
    if args.json {
        println!("{}", report_json(&old, &new, &findings));
    } else if findings.is_empty() {
        println!("{}", compatible_line(&old, &new));
    } else {
        for finding in &findings {
            println!("{finding}");
        }
        println!(
            "incompatible: {} from release {} to {}",
            count(findings.len(), "breaking change"),
            old.release,
            new.release
        );
    }
    Ok(if findings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(BREAKS_FOUND)
    })
}

fn read_dump(path: &Path) -> Result<VmStateDump, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    VmStateDump::from_json(&text).map_err(|e| format!("{}: {}", path.display(), chain(&e)))
}

fn compatible_line(old: &VmStateDump, new: &VmStateDump) -> String {
    let properties: usize = old.drivers.iter().map(|d| d.properties.len()).sum();
    format!(
        "compatible: release {} to {}, checked {}, {}, {}",
        old.release,
        new.release,
        count(old.machines.len(), "machine type"),
        count(properties, "property"),
        count(old.devices.len(), "device state")
    )
}

/// `1 machine type`, `2 machine types`, `3 properties`.
fn count(n: usize, noun: &str) -> String {
    match (n, noun.strip_suffix('y')) {
        (1, _) => format!("1 {noun}"),
        (_, Some(stem)) => format!("{n} {stem}ies"),
        (_, None) => format!("{n} {noun}s"),
    }
}

/// `{"format", "old_release", "new_release", "compatible", "findings": [{"kind", ...,
/// "message"}]}`: each finding's fields as the engine names them, and its line of text.
fn report_json(old: &VmStateDump, new: &VmStateDump, findings: &[Finding]) -> serde_json::Value {
    let findings: Vec<serde_json::Value> = findings
        .iter()
        .map(|f| {
            let mut v = serde_json::to_value(f).expect("a finding holds strings and numbers");
            v["message"] = f.to_string().into();
            v
        })
        .collect();
    json!({
        "format": REPORT_FORMAT,
        "old_release": old.release,
        "new_release": new.release,
        "compatible": findings.is_empty(),
        "findings": findings,
    })
}
