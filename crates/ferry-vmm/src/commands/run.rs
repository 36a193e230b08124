//! `ferry run`: one VM, driven through its QMP socket.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Args, ValueEnum};
use ferry_migration::compat::Global;
use ferry_migration::engine::human_bytes;
use ferry_vmm::control::Control;
use ferry_vmm::devices::accel::AccelConfig;
use ferry_vmm::guest::VcpuWork;
use ferry_vmm::vmm::{Backend, Vmm, VmmConfig};

use super::{chain, parse_size, qmp_path, CliError, CliResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// KVM when /dev/kvm is usable, else the soft backend
    Auto,
    /// Guest RAM in this process, a thread as its vCPU; no hypervisor needed
    Soft,
    /// A real guest on /dev/kvm
    Kvm,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Hypervisor backend
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendArg,
    /// Guest RAM size
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    pub mem: u64,
    /// Machine type (`ferry` is the newest; see `ferry machines`)
    #[arg(long, short = 'M', default_value = "ferry")]
    pub machine: String,
    /// Override a device or migration property: DRIVER.PROP=VALUE (repeatable; `-global` works too)
    #[arg(long = "global", value_name = "DRIVER.PROP=VALUE")]
    pub globals: Vec<String>,
    /// Number of vCPUs
    #[arg(long, default_value_t = 1)]
    pub vcpus: usize,
    /// Bytes of RAM each vCPU's workload dirties each pass, one byte per 4 KiB page, each
    /// vCPU in its own range. 0 for an idle guest that writes no RAM: on soft its vCPUs
    /// sleep and their pass counters stand still; on KVM its vCPUs still count passes,
    /// about 100 a second, and write only their counters
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub dirty: u64,
    /// Each vCPU's work instead of --dirty for all, one per vCPU (as many as --vcpus):
    /// SIZE dirties a range of SIZE each pass (0: idle), `compute` spins a fixed amount
    /// per pass and writes no RAM but its pass counter. For example `--vcpus 2
    /// --vcpu-dirty 256M,compute`: one vCPU that dirties memory, one that only computes
    /// (what a dirty-limit must tell apart)
    #[arg(long, value_name = "SIZE|compute[,...]", value_delimiter = ',',
          value_parser = parse_vcpu_work)]
    pub vcpu_dirty: Vec<VcpuWork>,
    /// KVM: track dirty pages with KVM's per-vCPU dirty ring (on, when this host's KVM
    /// offers it; it also measures each vCPU's dirty rate, which a dirty-limit needs) or
    /// with the per-memslot dirty bitmap (off)
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off,
          action = clap::ArgAction::Set)]
    pub dirty_ring: bool,
    /// Pages per second each vCPU's workload dirties at most; 0 for as fast as it can.
    /// soft: the vCPU thread sleeps between chunks of 64 pages; KVM: the guest reports
    /// every 64 pages to the VMM, whose vCPU thread sleeps in that exit. The rate moves
    /// with the guest when it migrates. Needs a non-zero --dirty; not with --incoming
    #[arg(long, default_value_t = 0)]
    pub dirty_rate: u64,
    /// Write this many bytes of pseudo-random, non-zero data (it neither compresses nor
    /// has zero pages) into guest RAM after the dirtied ranges before the guest starts,
    /// the same data on both backends; on KVM, x-ferry-verify checks it too, wherever the
    /// guest has migrated. Not with --incoming: a destination gets the source's memory
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub fill: u64,
    /// Wait for an incoming migration on tcp:HOST:PORT or unix:PATH instead of starting a guest
    #[arg(long, value_name = "URI")]
    pub incoming: Option<String>,
    /// Serve QMP on this unix socket (PATH or unix:PATH)
    #[arg(long, value_name = "PATH", value_parser = qmp_path)]
    pub qmp: Option<PathBuf>,
    /// Create the guest stopped (resume with `cont`)
    #[arg(short = 'S', long)]
    pub paused: bool,
    /// Attach an accelerator, a VFIO-style device with memory of its own that its device
    /// thread keeps rewriting: SIZE of device memory (up to 512M; 256M when no SIZE is
    /// given), the host DRIVER's name (both sides must have the same; ferry-accel by
    /// default), and whether this host's driver can precopy it (on by default; off: all
    /// of its state moves in the downtime). Repeat for more; 0 for none
    #[arg(long, value_name = "SIZE[,driver=NAME][,precopy=on|off]", num_args = 0..=1,
          default_missing_value = "256M", action = clap::ArgAction::Append,
          value_parser = parse_accel)]
    pub accel: Vec<Option<AccelConfig>>,
    /// Fault in all of guest RAM at start (as QEMU's -mem-prealloc): an incoming VM then
    /// receives pages into memory the host has already handed out, instead of paying for
    /// the first touch of each page during the migration
    #[arg(long)]
    pub prealloc: bool,
    /// Migrate with TLS 1.3 and mutual x509 authentication, with the credentials in DIR
    /// as QEMU lays them out (ca-cert.pem; server-cert.pem and server-key.pem for a
    /// destination; client-cert.pem and client-key.pem for a source; `ferry tls-creds`
    /// makes test ones). Every migration in or out of this VM is then TLS; plaintext
    /// peers are refused
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// With --tls-creds on a destination: the client identities (certificate subject CN
    /// or SAN) allowed to migrate into this VM, comma-separated [default: any the CA
    /// vouches for]
    #[arg(long, value_name = "ID[,ID...]", requires = "tls_creds")]
    pub tls_authz: Option<String>,
    /// With --tls-creds on a source: the name to check in the destination's certificate
    /// [default: the host of the migration address]
    #[arg(long, value_name = "NAME", requires = "tls_creds")]
    pub tls_hostname: Option<String>,
}

fn parse_vcpu_work(s: &str) -> Result<VcpuWork, String> {
    VcpuWork::parse(s)
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?}: expected on or off")),
    }
}

/// `--accel` as `AccelConfig`; `0` for none.
fn parse_accel(s: &str) -> Result<Option<AccelConfig>, String> {
    if s == "0" {
        return Ok(None);
    }
    s.parse().map(Some)
}

impl RunArgs {
    /// The accelerators `--accel` asks for, in order.
    pub fn accels(&self) -> Vec<AccelConfig> {
        self.accel.iter().flatten().cloned().collect()
    }

    /// Refuses flags that would do nothing in this combination rather than ignore them.
    fn check_workload(&self) -> Result<(), CliError> {
        if self.incoming.is_some() {
            for (flag, set) in [
                ("--dirty-rate", self.dirty_rate > 0),
                ("--fill", self.fill > 0),
            ] {
                if set {
                    return Err(CliError::msg(format!(
                        "{flag} is not supported with --incoming: the guest's memory and its \
                         workload come from the source; give {flag} to the source's ferry run"
                    )));
                }
            }
        }
        if !self.vcpu_dirty.is_empty() && self.vcpu_dirty.len() != self.vcpus {
            return Err(CliError::msg(format!(
                "--vcpu-dirty gives the work of {} vCPUs, --vcpus {} asks for {}; give one per vCPU",
                self.vcpu_dirty.len(),
                self.vcpus,
                self.vcpus
            )));
        }
        if self.incoming.is_some() && !self.vcpu_dirty.is_empty() {
            return Err(CliError::msg(
                "--vcpu-dirty is not supported with --incoming: the vCPUs' work comes from the \
                 source; give --vcpu-dirty to the source's ferry run",
            ));
        }
        if self.dirty_rate > 0 && self.dirty == 0 {
            return Err(CliError::msg(format!(
                "--dirty-rate {} paces the pages the guest dirties, and --dirty 0 makes an \
                 idle guest that dirties none; give --dirty a size, or drop --dirty-rate",
                self.dirty_rate
            )));
        }
        Ok(())
    }

    pub fn vmm_config(&self) -> Result<VmmConfig, CliError> {
        self.check_workload()?;
        let globals = self
            .globals
            .iter()
            .map(|g| g.parse::<Global>())
            .collect::<Result<Vec<_>, _>>()?;
        let backend = match self.backend {
            BackendArg::Soft => Backend::Soft,
            BackendArg::Kvm => Backend::Kvm,
            BackendArg::Auto => {
                if ferry_vmm::vmm::kvm_usable().is_ok() {
                    Backend::Kvm
                } else {
                    Backend::Soft
                }
            }
        };
        if backend == Backend::Kvm && self.backend == BackendArg::Kvm {
            if let Err(e) = ferry_vmm::vmm::kvm_usable() {
                return Err(CliError::msg(format!(
                    "{e}; use --backend soft to run without KVM"
                )));
            }
        }
        Ok(VmmConfig {
            backend,
            machine: self.machine.clone(),
            globals,
            mem_size: self.mem,
            vcpus: self.vcpus,
            dirty_size: self.dirty,
            vcpu_work: self.vcpu_dirty.clone(),
            dirty_rate: self.dirty_rate,
            dirty_ring: self.dirty_ring,
            fill: self.fill,
            incoming: self.incoming.is_some(),
            paused: self.paused,
            accels: self.accels(),
        })
    }
}

pub fn main(args: RunArgs) -> CliResult {
    let cfg = args.vmm_config()?;
    let vmm = Vmm::new(&cfg)?;
    if args.prealloc {
        let t = std::time::Instant::now();
        let bytes = ferry_vmm::memory::prefault(vmm.vm().ram().as_ref())
            .map_err(|e| CliError::msg(format!("--prealloc: cannot fault in guest RAM: {e}")))?;
        eprintln!(
            "ferry: pre-faulted {} of guest RAM in {:.1} s",
            human_bytes(bytes),
            t.elapsed().as_secs_f64()
        );
    }
    if let Some(dir) = &args.tls_creds {
        vmm.set_tls_creds(Some(dir.clone()))?;
    }
    if let Some(a) = &args.tls_authz {
        vmm.set_tls_authz(a);
    }
    vmm.set_tls_hostname(args.tls_hostname.clone());
    let control = Control::new(vmm.clone());
    let _server = match &args.qmp {
        Some(p) => Some(control.serve(p).map_err(|e| CliError::Io {
            what: format!("cannot serve QMP on {}", p.display()),
            source: e,
        })?),
        None => None,
    };
    let workload = if args.incoming.is_some() {
        "workload from the source".to_string()
    } else if !args.vcpu_dirty.is_empty() {
        format!(
            "vCPUs {}",
            args.vcpu_dirty
                .iter()
                .map(|w| match w {
                    VcpuWork::Compute => "computing".to_string(),
                    VcpuWork::Dirty(0) => "idle".to_string(),
                    VcpuWork::Dirty(d) => format!("dirtying {}", human_bytes(*d)),
                })
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else if args.dirty == 0 {
        "idle workload".to_string()
    } else {
        format!(
            "workload dirtying {} per vCPU{}",
            human_bytes(args.dirty),
            match args.dirty_rate {
                0 => String::new(),
                r => format!(" at {r} pages/s"),
            }
        )
    };
    let fill = match args.fill {
        0 => String::new(),
        f => format!(", {} filled", human_bytes(f)),
    };
    let tls = match &args.tls_creds {
        Some(d) => format!(", TLS with the credentials in {}", d.display()),
        None => String::new(),
    };
    eprintln!(
        "ferry: {} VM on the {} backend, machine {}: {} RAM, {} vCPU(s), {workload}{fill}{tls}{}{}",
        if args.incoming.is_some() {
            "incoming"
        } else {
            "running"
        },
        vmm.vm().backend(),
        vmm.config().machine(),
        human_bytes(args.mem),
        vmm.vm().vcpu_count(),
        args.accels()
            .iter()
            .map(|a| format!(
                ", accelerator with {} of device memory (driver {}, precopy {})",
                human_bytes(a.size),
                a.driver,
                if a.precopy { "on" } else { "off" }
            ))
            .collect::<String>(),
        args.qmp
            .as_ref()
            .map(|p| format!("; QMP on {}", p.display()))
            .unwrap_or_default()
    );
    let failed = Arc::new(AtomicBool::new(false));
    if let Some(uri) = &args.incoming {
        if uri != "defer" {
            let c2 = control.clone();
            let f2 = failed.clone();
            let v2 = vmm.clone();
            let bound = vmm.incoming(uri, move |r| match r {
                Ok(info) => eprintln!(
                    "ferry: migration received ({} verified) in {} ms; the guest {} here at pass {}",
                    info.verified.as_deref().unwrap_or("none"),
                    info.total_time,
                    if v2.vm().is_running() { "runs" } else { "is stopped (as at the source; `cont` resumes it)" },
                    v2.vm().report().passes.iter().map(u64::to_string).collect::<Vec<_>>().join("/")
                ),
                Err(e) => {
                    eprintln!("ferry: incoming migration failed: {}; the guest was not started", chain(&e));
                    f2.store(true, Ordering::SeqCst);
                    c2.request_quit();
                }
            })?;
            println!("listening for an incoming migration on {bound}");
            let _ = std::io::stdout().flush();
        }
    }
    if args.qmp.is_none() && args.incoming.is_none() {
        eprintln!("ferry: no --qmp socket: this VM can only be stopped with Ctrl-C");
    }
    control.wait_quit(None);
    if let Err(e) = vmm.cancel_migration() {
        // Committed: the destination decides. Leaving now could lose the guest if the
        // destination then fails to load it, so wait for its answer (bounded by the
        // engine's completion timeout).
        eprintln!("ferry: {e}; waiting for the destination's answer before exiting");
        vmm.join_worker();
    }
    // `quit` is answered by the connection's writer thread; give it a moment to reach
    // the client before the process ends.
    std::thread::sleep(std::time::Duration::from_millis(50));
    Ok(if failed.load(Ordering::SeqCst) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use ferry_vmm::devices::accel::ACCEL_DEFAULT_SIZE;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn accels(args: &[&str]) -> Vec<AccelConfig> {
        Cli::try_parse_from(["ferry"].iter().chain(args))
            .unwrap()
            .run
            .accels()
    }

    /// The first accelerator's size, 0 for none.
    fn accel(args: &[&str]) -> u64 {
        accels(args).first().map_or(0, |a| a.size)
    }

    #[test]
    fn accel_options_take_a_driver_and_the_hosts_precopy_and_repeat() {
        let a = accels(&[
            "--accel",
            "64M,driver=mlx5_vfio_pci,precopy=off",
            "--accel",
            "32M",
            "--accel",
            "driver=x",
        ]);
        assert_eq!(
            a,
            [
                AccelConfig {
                    size: 64 << 20,
                    driver: "mlx5_vfio_pci".into(),
                    precopy: false
                },
                AccelConfig {
                    size: 32 << 20,
                    driver: "ferry-accel".into(),
                    precopy: true
                },
                AccelConfig {
                    size: ACCEL_DEFAULT_SIZE,
                    driver: "x".into(),
                    precopy: true
                },
            ]
        );
        assert!(accels(&["--accel", "0"]).is_empty());
        for bad in ["64M,precopy=maybe", "64M,colour=red", "64M,driver=", "lots"] {
            let e = Cli::try_parse_from(["ferry", "--accel", bad]).unwrap_err();
            assert!(e.to_string().contains("accelerator"), "{bad}: {e}");
        }
    }

    fn config(args: &[&str]) -> Result<VmmConfig, String> {
        let mut all = vec!["ferry", "--backend", "soft"];
        all.extend(args);
        Cli::try_parse_from(all)
            .unwrap()
            .run
            .vmm_config()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn workload_flags_that_would_do_nothing_are_refused_by_name() {
        let e = config(&["--dirty", "0", "--dirty-rate", "1000"]).unwrap_err();
        assert!(
            e.contains("--dirty-rate 1000") && e.contains("--dirty 0"),
            "{e}"
        );
        for flag in [["--dirty-rate", "1000"], ["--fill", "16M"]] {
            let mut args = vec!["--incoming", "tcp:127.0.0.1:0"];
            args.extend(flag);
            let e = config(&args).unwrap_err();
            assert!(
                e.contains(&format!("{} is not supported with --incoming", flag[0])),
                "{e}"
            );
        }
        let ok = config(&["--dirty", "0", "--fill", "16M"]).unwrap();
        assert_eq!((ok.dirty_size, ok.dirty_rate, ok.fill), (0, 0, 16 << 20));
        let ok = config(&["--dirty", "8M", "--dirty-rate", "500"]).unwrap();
        assert_eq!((ok.dirty_size, ok.dirty_rate), (8 << 20, 500));
        let dst = config(&["--dirty", "8M", "--incoming", "defer"]).unwrap();
        assert!(dst.incoming);
        let two = config(&["--vcpus", "2", "--vcpu-dirty", "8M,compute"]).unwrap();
        assert_eq!(two.vcpu_work, [VcpuWork::Dirty(8 << 20), VcpuWork::Compute]);
        let e = config(&["--vcpus", "3", "--vcpu-dirty", "8M,compute"]).unwrap_err();
        assert!(e.contains("--vcpu-dirty gives the work of 2 vCPUs"), "{e}");
        assert!(Cli::try_parse_from(["ferry", "--vcpu-dirty", "8M,lots"]).is_err());
        assert!(!config(&["--dirty-ring", "off"]).unwrap().dirty_ring);
    }

    #[test]
    fn accel_option_is_off_by_default_and_256m_without_a_size() {
        assert_eq!(accel(&[]), 0);
        assert_eq!(accel(&["--accel"]), ACCEL_DEFAULT_SIZE);
        assert_eq!(accel(&["--accel", "64M"]), 64 << 20);
        assert_eq!(accel(&["--accel", "-S"]), ACCEL_DEFAULT_SIZE);
    }
}
