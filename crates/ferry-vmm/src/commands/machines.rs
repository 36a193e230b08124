//! `ferry machines`: the machine types and their effective properties.

use std::process::ExitCode;

use clap::Args;
use ferry_migration::compat::{Global, Origin};
use serde_json::json;

use super::CliResult;

#[derive(Debug, Args)]
pub struct MachinesArgs {
    /// A machine type (or `ferry`, the newest) to show every effective property of
    pub machine: Option<String>,
    /// Apply these overrides, as `ferry run` would: DRIVER.PROP=VALUE
    #[arg(long = "global", value_name = "DRIVER.PROP=VALUE")]
    pub globals: Vec<String>,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

pub fn main(args: MachinesArgs) -> CliResult {
    let reg = ferry_vmm::machine::registry();
    let Some(name) = args.machine else {
        if args.json {
            let v: Vec<_> = reg
                .machines()
                .iter()
                .enumerate()
                .map(|(i, m)| json!({ "name": m.name, "release": m.release, "doc": m.doc, "newest": i == 0 }))
                .collect();
            println!("{}", serde_json::Value::Array(v));
        } else {
            println!("Machine types (newest first):");
            for (i, m) in reg.machines().iter().enumerate() {
                let alias = if i == 0 { " (alias: ferry)" } else { "" };
                println!("  {:<12} {}{alias}", m.name, m.doc);
            }
            println!("\n`ferry machines NAME` shows a machine type's properties and where each value comes from.");
        }
        return Ok(ExitCode::SUCCESS);
    };
    let globals = args
        .globals
        .iter()
        .map(|g| g.parse::<Global>())
        .collect::<Result<Vec<_>, _>>()?;
    let cfg = reg.configure(&name, &globals)?;
    if args.json {
        let props: Vec<_> = cfg
            .iter()
            .map(|(d, p, v, o)| json!({ "driver": d, "property": p, "value": v.to_string(), "origin": o.to_string() }))
            .collect();
        println!(
            "{}",
            json!({ "machine": cfg.machine(), "properties": props })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}:", cfg.machine());
    let width = cfg
        .iter()
        .map(|(d, p, ..)| d.len() + 1 + p.len())
        .max()
        .unwrap_or(0);
    for (d, p, v, o) in cfg.iter() {
        let wire = reg.property(d, p).map(|(_, def)| def.wire).unwrap_or(false);
        let origin = match o {
            Origin::Default => "default".to_string(),
            o => o.to_string(),
        };
        println!(
            "  {:<width$} {:<10} {origin}{}",
            format!("{d}.{p}"),
            v.to_string(),
            if wire {
                "  [must match on both sides]"
            } else {
                ""
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
