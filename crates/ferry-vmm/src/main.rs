//! `ferry`: run a VM, migrate it, watch it, or see the whole thing in one `ferry demo`.

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Live migration of virtual machines",
    long_about = "ferry moves a running VM from one process (or host) to another while its guest keeps running.\n\n\
                  Start with `ferry demo`: it runs a source and a destination on this machine, migrates a \
                  running guest between them and shows what happened.",
    after_help = "Examples:\n  \
                  ferry demo\n  \
                  ferry run --qmp /tmp/src.sock --mem 1G --dirty 100M\n  \
                  ferry run --qmp /tmp/dst.sock --mem 1G --incoming tcp:127.0.0.1:4444\n  \
                  ferry migrate --qmp /tmp/src.sock tcp:127.0.0.1:4444\n  \
                  ferry status --qmp /tmp/dst.sock"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Migrate a running built-in guest between two ferry processes on this machine and report
    Demo(commands::demo::DemoArgs),
    /// Run a VM (or wait for one with --incoming) until `quit` on its QMP socket
    Run(commands::run::RunArgs),
    /// Tell a running VM to migrate, show progress and the final statistics
    Migrate(commands::migrate::MigrateArgs),
    /// Show a VM's state and its last migration
    Status(commands::migrate::StatusArgs),
    /// Take back a guest whose handover is in doubt, after checking that the destination
    /// does not run it
    Reclaim(commands::migrate::StatusArgs),
    /// List machine types, or show one machine type's effective properties
    Machines(commands::machines::MachinesArgs),
    /// Write this release's machine types, properties and device state schemas as JSON
    DumpVmstate(commands::compat::DumpArgs),
    /// Compare two releases' dumps and list every change that breaks migration between them
    CompatCheck(commands::compat::CheckArgs),
    /// Write test TLS credentials (a CA, a server and a client certificate) into a directory
    TlsCreds(commands::tls_creds::TlsCredsArgs),
}

/// Keeps freed heap memory for reuse instead of handing it back to the kernel at once.
///
/// glibc unmaps a freed allocation of 128 KiB or more, and trims the heap once 128 KiB
/// at its top are free; a migration over TLS allocates and frees its records' buffers
/// frame after frame, so each frame faulted its buffers in again: a quarter of the
/// source's CPU went to page faults inside `memmove`. Allocations below 32 MiB now come
/// from the heap, and up to 64 MiB of free heap is kept. Guest RAM and the engine's page
/// bitmaps are mappings of their own and are not affected.
fn keep_freed_heap() {
    // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

fn main() -> ExitCode {
    keep_freed_heap();
    // QEMU spells it `-global`; clap wants two dashes.
    let args = std::env::args_os().map(|a| if a == "-global" { "--global".into() } else { a });
    let cli = Cli::parse_from(args);
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let r = match cli.command {
        Command::Demo(a) => commands::demo::main(a),
        Command::Run(a) => commands::run::main(a),
        Command::Migrate(a) => commands::migrate::main(a),
        Command::Status(a) => commands::migrate::status(a),
        Command::Reclaim(a) => commands::migrate::reclaim(a),
        Command::Machines(a) => commands::machines::main(a),
        Command::DumpVmstate(a) => commands::compat::dump_vmstate(a),
        Command::CompatCheck(a) => commands::compat::compat_check(a),
        Command::TlsCreds(a) => commands::tls_creds::main(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {}", commands::chain(&e));
            ExitCode::FAILURE
        }
    }
}
