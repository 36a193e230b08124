//! The VM's QMP commands: what `ferry run --qmp` answers.
//!
//! Names, arguments and replies follow QEMU's where the meaning is the same, so QMP
//! clients written for QEMU (libvirt, `qemu.qmp`, `qmp-shell`) work unchanged for what
//! ferry implements. ferry's own additions start with `x-ferry-`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::qmp::{version_info, QmpError, QmpHandler, QmpServer, Reply};
use crate::vmm::{RunState, Vmm, VmmError, VmmEvent};
use ferry_migration::compat::{PropDef, PropKind};
use ferry_migration::engine::{
    error_chain, Handover, MigrationStatus, TimeoutStrategy, MIGRATION_DRIVER,
};
use ferry_migration::wire::MAX_CHANNELS;

/// Answers QMP commands for one VM.
pub struct Control {
    vmm: Arc<Vmm>,
    quit: Arc<(Mutex<bool>, Condvar)>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("vmm", &self.vmm).finish()
    }
}

impl Control {
    pub fn new(vmm: Arc<Vmm>) -> Arc<Self> {
        Arc::new(Self {
            vmm,
            quit: Arc::new((Mutex::new(false), Condvar::new())),
        })
    }

    /// Serves QMP on `path` and forwards the VM's events to its clients.
    pub fn serve(self: &Arc<Self>, path: &std::path::Path) -> std::io::Result<QmpServer> {
        let server = QmpServer::bind(path, self.clone())?;
        let events = server.events();
        let vmm = Arc::downgrade(&self.vmm);
        let stopped_for_switchover = AtomicBool::new(false);
        self.vmm.set_event_sink(move |e| {
            let Some(vmm) = vmm.upgrade() else { return };
            match e {
                VmmEvent::Migration(s) => {
                    events.emit("MIGRATION", json!({ "status": s.as_str() }));
                    // The engine enters `device` just before it pauses a running source
                    // guest for the switchover: that is when QEMU sends STOP. A failed
                    // or cancelled switchover resumes the guest before the status says
                    // so, and QEMU sends RESUME for that.
                    match s {
                        MigrationStatus::Device if vmm.run_state() == RunState::Running => {
                            stopped_for_switchover.store(true, Ordering::SeqCst);
                            events.emit("STOP", Value::Null);
                        }
                        MigrationStatus::Failed | MigrationStatus::Cancelled => {
                            let was_stopped = stopped_for_switchover.swap(false, Ordering::SeqCst);
                            if was_stopped && vmm.vm().is_running() {
                                events.emit("RESUME", Value::Null);
                            }
                        }
                        MigrationStatus::Setup | MigrationStatus::Completed => {
                            stopped_for_switchover.store(false, Ordering::SeqCst);
                        }
                        _ => {}
                    }
                }
                VmmEvent::MigrationPass(p) => {
                    events.emit("MIGRATION_PASS", json!({ "pass": p }));
                }
                VmmEvent::Convergence { converging, why } => {
                    let mut data = json!({ "status": "active", "converging": converging });
                    if let Some(why) = why {
                        data["why"] = json!(why);
                    }
                    events.emit("MIGRATION", data);
                }
                VmmEvent::Handover(h) => {
                    let mut data = json!({ "state": h.as_str() });
                    if h == Handover::InDoubt {
                        data["advice"] = json!(crate::vmm::IN_DOUBT_ADVICE);
                    }
                    events.emit("X_FERRY_HANDOVER", data);
                }
                // After a completed migration the VMM reports the guest stopped; STOP
                // went out at the switchover already (or at `stop`, if it was paused).
                VmmEvent::Stop if vmm.run_state() == RunState::PostMigrate => {}
                VmmEvent::Stop => {
                    events.emit("STOP", Value::Null);
                }
                VmmEvent::Resume => {
                    events.emit("RESUME", Value::Null);
                }
            }
        });
        Ok(server)
    }

    /// Asks the process to exit, as `quit` does.
    pub fn request_quit(&self) {
        let (m, cv) = &*self.quit;
        *m.lock().unwrap() = true;
        cv.notify_all();
    }

    /// Blocks until `quit` (or [`Control::request_quit`]), or until `timeout` passes.
    /// Returns true when quit was asked.
    pub fn wait_quit(&self, timeout: Option<Duration>) -> bool {
        let (m, cv) = &*self.quit;
        let mut q = m.lock().unwrap();
        match timeout {
            None => {
                while !*q {
                    q = cv.wait(q).unwrap();
                }
                true
            }
            Some(t) => {
                let (q, _) = cv.wait_timeout_while(q, t, |q| !*q).unwrap();
                *q
            }
        }
    }

    fn query_migrate(&self) -> Value {
        let info = self.vmm.query_migrate();
        if info.status == MigrationStatus::None {
            // No migration yet, as QEMU says it; a destination still waiting for its
            // source shows what it has turned away meanwhile.
            return match info.multifd.filter(|m| !m.strays.is_empty()) {
                Some(m) => json!({ "multifd": { "strays": m.strays } }),
                None => json!({}),
            };
        }
        serde_json::to_value(&info).unwrap_or_else(|_| json!({}))
    }

    fn query_params(&self) -> Value {
        let p = self.vmm.params();
        let tls = self.vmm.tls();
        let (_, channels) = self.vmm.multifd();
        json!({
            "downtime-limit": p.downtime_limit.as_millis() as u64,
            "max-bandwidth": p.max_bandwidth,
            "multifd-channels": channels,
            "multifd-compression": p.multifd_compression.name(),
            "multifd-zstd-level": p.multifd_zstd_level,
            "verify-full": p.verify_full,
            "digest": p.digest,
            "cpu-throttle-initial": p.cpu_throttle_initial,
            "cpu-throttle-increment": p.cpu_throttle_increment,
            "cpu-throttle-tailslow": p.cpu_throttle_tailslow,
            "max-cpu-throttle": p.max_cpu_throttle,
            "throttle-trigger-threshold": p.throttle_trigger_threshold,
            "vcpu-dirty-limit": p.vcpu_dirty_limit_mbps,
            "x-vcpu-dirty-limit-period": p.vcpu_dirty_limit_period.as_millis() as u64,
            "x-ferry-timeout": p.timeout.map_or(0, |t| t.as_secs()),
            "x-ferry-timeout-per-gib": p.timeout_per_gib.as_secs(),
            "x-ferry-timeout-strategy": match p.timeout_strategy {
                TimeoutStrategy::Cancel => "cancel",
                TimeoutStrategy::Switchover => "switchover",
            },
            "x-ferry-switchover-ceiling": p.switchover_ceiling.as_millis() as u64,
            // As QEMU shows them: empty strings for unset.
            "tls-creds": tls.creds.map(|d| d.display().to_string()).unwrap_or_default(),
            "tls-hostname": tls.hostname.unwrap_or_default(),
            "tls-authz": tls.authz.map(|a| a.join(",")).unwrap_or_default(),
        })
    }

    /// `migrate-set-parameters`: checks every argument, then applies them all.
    fn set_params(&self, args: &Map<String, Value>) -> Result<(), QmpError> {
        let current = self.vmm.params();
        let mut changes = Vec::new();
        // The data channels' settings, which a migration fixes when it starts: their
        // count (kept while the multifd capability is off) and the other properties.
        let mut channels = None;
        let mut multifd = Vec::new();
        // TLS: tls-creds (a directory, "" for none), tls-hostname, tls-authz.
        let mut tls = Vec::new();
        for (k, v) in args {
            match k.as_str() {
                "tls-creds" | "tls-hostname" | "tls-authz" => {
                    tls.push((k.as_str(), str_value(k, v)?.to_string()));
                }
                "downtime-limit"
                | "max-bandwidth"
                | "cpu-throttle-initial"
                | "cpu-throttle-increment"
                | "max-cpu-throttle"
                | "throttle-trigger-threshold"
                | "vcpu-dirty-limit"
                | "x-vcpu-dirty-limit-period"
                | "x-ferry-timeout"
                | "x-ferry-timeout-per-gib"
                | "x-ferry-switchover-ceiling" => {
                    let n = uint_value(k, v)?;
                    check_range(k, n)?;
                    changes.push((k.as_str(), n.to_string()));
                }
                "cpu-throttle-tailslow" => {
                    let on = bool_value(k, v)?;
                    changes.push((k.as_str(), if on { "on" } else { "off" }.to_string()));
                }
                "x-ferry-timeout-strategy" => {
                    let c = str_value(k, v)?;
                    let valid = prop_values(k);
                    if !valid.contains(&c) {
                        return Err(QmpError::generic(format!(
                            "Parameter '{k}' does not accept value '{c}'; the valid values are {}",
                            valid.join(", ")
                        )));
                    }
                    changes.push((k.as_str(), c.to_string()));
                }
                "verify-full" => {
                    let on = bool_value(k, v)?;
                    changes.push((k.as_str(), if on { "on" } else { "off" }.to_string()));
                }
                "digest" => {
                    if bool_value(k, v)? != current.digest {
                        return Err(QmpError::generic(
                            "Parameter 'digest' cannot change at run time: it changes what travels \
                             on the stream, so both sides take it from the machine type or \
                             -global migration.digest=on|off",
                        ));
                    }
                }
                "multifd-channels" => {
                    let n = uint_value(k, v)?;
                    check_between(k, n, 1, MAX_CHANNELS.into())?;
                    channels = Some(n as u16);
                }
                "multifd-zstd-level" => {
                    let n = uint_value(k, v)?;
                    let (min, max) = prop_range(k);
                    check_between(k, n, min, max)?;
                    multifd.push((k.as_str(), n.to_string()));
                }
                "multifd-compression" => {
                    let c = str_value(k, v)?;
                    let valid = prop_values(k);
                    if !valid.contains(&c) {
                        return Err(QmpError::generic(format!(
                            "Parameter 'multifd-compression' does not accept value '{c}'; \
                             the valid values are {}",
                            valid.join(", ")
                        )));
                    }
                    multifd.push((k.as_str(), c.to_string()));
                }
                _ => {
                    return Err(QmpError::generic(format!(
                        "Parameter '{k}' is unexpected; the migration parameters ferry has are {}",
                        PARAMETERS.join(", ")
                    )))
                }
            }
        }
        let first = channels
            .map(|_| "multifd-channels")
            .or(multifd.first().map(|(k, _)| *k));
        if let Some(k) = first {
            if self.vmm.migrating() {
                return Err(QmpError::generic(format!(
                    "There's a migration process in progress; '{k}' applies to the next \
                     migration and cannot change until this one ends"
                )));
            }
        }
        for (k, v) in tls {
            match k {
                "tls-creds" => self.vmm.set_tls_creds(Some(v.into())).map_err(vmm_err)?,
                "tls-hostname" => self.vmm.set_tls_hostname(Some(v)),
                _ => self.vmm.set_tls_authz(&v),
            }
        }
        if let Some(n) = channels {
            self.vmm.set_multifd_channels(n).map_err(vmm_err)?;
        }
        for (k, v) in multifd.into_iter().chain(changes) {
            self.vmm.set_migration_property(k, &v).map_err(vmm_err)?;
        }
        Ok(())
    }

    /// `migrate-set-capabilities`: `multifd` turns the data channels on or off for the
    /// next migration; every other capability ferry has is fixed, so for those this
    /// checks that the request asks for what is, and says why when it does not.
    fn set_capabilities(&self, args: &Map<String, Value>) -> Result<(), QmpError> {
        if let Some(k) = args.keys().find(|k| *k != "capabilities") {
            return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
        }
        let list = match args.get("capabilities") {
            Some(Value::Array(list)) => list,
            Some(_) => return Err(type_error("capabilities", "array")),
            None => return Err(missing("capabilities")),
        };
        let mut wanted = Vec::new();
        for (i, item) in list.iter().enumerate() {
            let at = format!("capabilities[{i}]");
            let Value::Object(item) = item else {
                return Err(type_error(&at, "object"));
            };
            if let Some(k) = item.keys().find(|k| *k != "capability" && *k != "state") {
                return Err(QmpError::generic(format!(
                    "Parameter '{at}.{k}' is unexpected"
                )));
            }
            let name = match item.get("capability") {
                Some(Value::String(name)) => name,
                Some(_) => return Err(type_error(&format!("{at}.capability"), "string")),
                None => return Err(missing(&format!("{at}.capability"))),
            };
            let state = match item.get("state") {
                Some(Value::Bool(state)) => *state,
                Some(_) => return Err(type_error(&format!("{at}.state"), "boolean")),
                None => return Err(missing(&format!("{at}.state"))),
            };
            let Some(cap) = CAPABILITIES.iter().find(|c| c.name == name) else {
                return Err(QmpError::generic(format!(
                    "Parameter '{at}.capability' does not accept value '{name}'; \
                     the migration capabilities ferry has are {}",
                    CAPABILITIES.map(|c| c.name).join(", ")
                )));
            };
            wanted.push((cap, state));
        }
        if self.vmm.migrating() {
            return Err(QmpError::generic(
                "There's a migration process in progress; capabilities cannot change until it ends",
            ));
        }
        let mut multifd = None;
        let mut props = Vec::new();
        for (cap, state) in wanted {
            match cap.state {
                CapState::Multifd => multifd = Some(state),
                CapState::Prop(prop) => props.push((prop, state)),
                CapState::Fixed { state: fixed, .. } if fixed == state => {}
                CapState::Fixed { why, .. } => {
                    return Err(QmpError::generic(format!(
                        "Capability '{}' cannot be {}: {why}",
                        cap.name,
                        if state { "enabled" } else { "disabled" },
                    )));
                }
            }
        }
        // Both throttles at once is refused whole, before either changes.
        let mut p = self.vmm.params();
        for &(prop, on) in &props {
            match prop {
                "auto-converge" => p.auto_converge = on,
                "dirty-limit" => p.dirty_limit = on,
                _ => {}
            }
        }
        if let Some(why) = p.conflict() {
            return Err(QmpError::generic(why));
        }
        for (prop, on) in props {
            self.vmm
                .set_migration_property(prop, if on { "on" } else { "off" })
                .map_err(vmm_err)?;
        }
        if let Some(on) = multifd {
            self.vmm.set_multifd(on).map_err(vmm_err)?;
        }
        Ok(())
    }

    fn query_capabilities(&self) -> Value {
        CAPABILITIES
            .iter()
            .map(|c| {
                let state = match c.state {
                    CapState::Fixed { state, .. } => state,
                    CapState::Multifd => self.vmm.multifd().0,
                    CapState::Prop("auto-converge") => self.vmm.params().auto_converge,
                    CapState::Prop(_) => self.vmm.params().dirty_limit,
                };
                json!({ "capability": c.name, "state": state })
            })
            .collect()
    }
}

/// A migration capability QEMU names, as ferry has it.
struct Capability {
    name: &'static str,
    state: CapState,
}

enum CapState {
    /// The state cannot change; `why`, for the error when asked to change it.
    Fixed { state: bool, why: &'static str },
    /// On: pages travel on `multifd-channels` data channels. Off: on the main channel
    /// (the `migration.multifd-channels=0` property).
    Multifd,
    /// The boolean `migration` property of this name.
    Prop(&'static str),
}

/// What `query-migrate-capabilities` reports, in this order.
const CAPABILITIES: [Capability; 7] = [
    Capability {
        name: "events",
        state: CapState::Fixed {
            state: true,
            why: "ferry always sends MIGRATION and MIGRATION_PASS events",
        },
    },
    Capability {
        name: "return-path",
        state: CapState::Fixed {
            state: true,
            why: "ferry's source relies on the destination's return path to learn that the \
                  guest runs there, or why it refused or failed",
        },
    },
    Capability {
        name: "multifd",
        state: CapState::Multifd,
    },
    Capability {
        name: "postcopy-ram",
        state: CapState::Fixed {
            state: false,
            why: "this release of ferry has no postcopy; migration is precopy only",
        },
    },
    Capability {
        name: "auto-converge",
        state: CapState::Prop("auto-converge"),
    },
    Capability {
        name: "dirty-limit",
        state: CapState::Prop("dirty-limit"),
    },
    Capability {
        name: "xbzrle",
        state: CapState::Fixed {
            state: false,
            why: "this release of ferry has no XBZRLE; it sends zero pages as a flag and \
                  every other page whole",
        },
    },
];

/// What `migrate-set-parameters` knows, for the error about one it does not.
const PARAMETERS: [&str; 21] = [
    "downtime-limit",
    "max-bandwidth",
    "multifd-channels",
    "multifd-compression",
    "multifd-zstd-level",
    "verify-full",
    "digest",
    "cpu-throttle-initial",
    "cpu-throttle-increment",
    "cpu-throttle-tailslow",
    "max-cpu-throttle",
    "throttle-trigger-threshold",
    "vcpu-dirty-limit",
    "x-vcpu-dirty-limit-period",
    "x-ferry-timeout",
    "x-ferry-timeout-per-gib",
    "x-ferry-timeout-strategy",
    "x-ferry-switchover-ceiling",
    "tls-creds",
    "tls-hostname",
    "tls-authz",
];

fn type_error(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

fn missing(name: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' is missing"))
}

fn uint_value(name: &str, v: &Value) -> Result<u64, QmpError> {
    v.as_u64().ok_or_else(|| type_error(name, "integer"))
}

fn bool_value(name: &str, v: &Value) -> Result<bool, QmpError> {
    v.as_bool().ok_or_else(|| type_error(name, "boolean"))
}

fn str_value<'a>(name: &str, v: &'a Value) -> Result<&'a str, QmpError> {
    v.as_str().ok_or_else(|| type_error(name, "string"))
}

/// QEMU's wording for a multifd parameter out of its range.
fn check_between(name: &str, n: u64, min: u64, max: u64) -> Result<(), QmpError> {
    if (min..=max).contains(&n) {
        return Ok(());
    }
    Err(QmpError::generic(format!(
        "Parameter '{name}' expects a value between {min} and {max}"
    )))
}

/// A numeric migration property's range.
fn prop_range(name: &str) -> (u64, u64) {
    match MIGRATION_DRIVER.props.iter().find(|p| p.name == name) {
        Some(PropDef {
            kind: PropKind::U64 { min, max } | PropKind::Size { min, max },
            ..
        }) => (*min, *max),
        _ => (0, u64::MAX),
    }
}

/// An enumerated migration property's values.
fn prop_values(name: &str) -> &'static [&'static str] {
    match MIGRATION_DRIVER.props.iter().find(|p| p.name == name) {
        Some(PropDef {
            kind: PropKind::Enum(values),
            ..
        }) => values,
        _ => &[],
    }
}

/// QEMU's wording for a number out of a migration property's range.
fn check_range(name: &str, n: u64) -> Result<(), QmpError> {
    let Some(def) = MIGRATION_DRIVER.props.iter().find(|p| p.name == name) else {
        return Ok(());
    };
    let (PropKind::U64 { min, max } | PropKind::Size { min, max }) = def.kind else {
        return Ok(());
    };
    if (min..=max).contains(&n) {
        return Ok(());
    }
    let unit = match name {
        "downtime-limit" => " milliseconds",
        "max-bandwidth" => " bytes/second",
        _ => "",
    };
    Err(QmpError::generic(format!(
        "Parameter '{name}' expects an integer in the range of {min} to {max}{unit}"
    )))
}

fn vmm_err(e: VmmError) -> QmpError {
    QmpError::generic(error_chain(&e))
}

fn str_arg<'a>(args: &'a Map<String, Value>, name: &str) -> Result<&'a str, QmpError> {
    match args.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(QmpError::generic(format!(
            "Invalid parameter type for '{name}', expected: string"
        ))),
        None => Err(QmpError::generic(format!("Parameter '{name}' is missing"))),
    }
}

fn no_args(command: &str, args: &Map<String, Value>) -> Result<(), QmpError> {
    match args.keys().next() {
        Some(k) => Err(QmpError::generic(format!(
            "Parameter '{k}' is unexpected: {command} takes no arguments"
        ))),
        None => Ok(()),
    }
}

impl QmpHandler for Control {
    fn execute(&self, command: &str, args: Map<String, Value>) -> Result<Reply, QmpError> {
        let vmm = &self.vmm;
        let v = match command {
            "query-status" => {
                no_args(command, &args)?;
                let s = vmm.run_state();
                if s == RunState::Running
                    && vmm.monitor().status() == MigrationStatus::Device
                    && !vmm.vm().is_running()
                {
                    // Stopped for the switchover, as QEMU says.
                    json!({ "status": "finish-migrate", "running": false, "singlestep": false })
                } else {
                    json!({ "status": s.as_str(), "running": s == RunState::Running, "singlestep": false })
                }
            }
            "query-version" => version_info(),
            "query-commands" => json!([
                "qmp_capabilities",
                "query-status",
                "query-version",
                "query-commands",
                "stop",
                "cont",
                "migrate",
                "migrate-incoming",
                "query-migrate",
                "migrate_cancel",
                "migrate-cancel",
                "query-migrate-parameters",
                "migrate-set-parameters",
                "query-migrate-capabilities",
                "migrate-set-capabilities",
                "quit",
                "x-ferry-guest",
                "x-ferry-verify",
                "x-ferry-accel",
                "x-ferry-reclaim"
            ]
            .iter()
            .map(|n| json!({ "name": n }))
            .collect::<Vec<_>>()),
            "stop" => {
                no_args(command, &args)?;
                vmm.stop().map_err(vmm_err)?;
                json!({})
            }
            "cont" => {
                no_args(command, &args)?;
                vmm.cont().map_err(vmm_err)?;
                json!({})
            }
            "migrate" => {
                for (k, v) in &args {
                    match k.as_str() {
                        "uri" => {}
                        // QEMU's legacy flags: accepted for compatibility, meaningless here.
                        "detach" | "blk" | "inc" | "resume" => {
                            bool_value(k, v)?;
                        }
                        _ => {
                            return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")))
                        }
                    }
                }
                vmm.migrate(str_arg(&args, "uri")?).map_err(vmm_err)?;
                json!({})
            }
            "migrate-incoming" => {
                if let Some(k) = args.keys().find(|k| *k != "uri") {
                    return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
                }
                let uri = str_arg(&args, "uri")?;
                let bound = vmm
                    .incoming(uri, |r| {
                        if let Err(e) = r {
                            tracing::error!(error = %error_chain(&e), "incoming migration failed");
                        }
                    })
                    .map_err(vmm_err)?;
                tracing::info!(%bound, "listening for an incoming migration");
                json!({})
            }
            "query-migrate" => {
                no_args(command, &args)?;
                self.query_migrate()
            }
            "migrate_cancel" | "migrate-cancel" => {
                vmm.cancel_migration().map_err(vmm_err)?;
                json!({})
            }
            "x-ferry-reclaim" => {
                no_args(command, &args)?;
                vmm.reclaim().map_err(vmm_err)?;
                json!({})
            }
            "query-migrate-parameters" => {
                no_args(command, &args)?;
                self.query_params()
            }
            "migrate-set-parameters" => {
                self.set_params(&args)?;
                json!({})
            }
            "query-migrate-capabilities" => {
                no_args(command, &args)?;
                self.query_capabilities()
            }
            "migrate-set-capabilities" => {
                self.set_capabilities(&args)?;
                json!({})
            }
            "x-ferry-guest" => serde_json::to_value(vmm.vm().report()).unwrap_or(Value::Null),
            "x-ferry-verify" => {
                if matches!(
                    vmm.run_state(),
                    RunState::InMigrate | RunState::FailedIncoming | RunState::PostMigrate
                ) {
                    return Err(QmpError::generic(format!(
                        "the VM is {}; its guest is not here to verify",
                        vmm.run_state().as_str()
                    )));
                }
                let (checked, wrong) = vmm
                    .vm()
                    .verify()
                    .map_err(|e| QmpError::generic(error_chain(&e)))?;
                json!({ "pages-checked": checked, "pages-wrong": wrong })
            }
            "x-ferry-accel" => {
                // Optional `instance`, 0 by default: the first accelerator, as the
                // command answered when a VM had one at most.
                let mut rest = args.clone();
                let instance = match rest.remove("instance") {
                    None => 0,
                    Some(v) => uint_value("instance", &v)?,
                };
                no_args(command, &rest)?;
                let accels = vmm.vm().accels();
                let a = accels.get(instance as usize).ok_or_else(|| {
                    QmpError::generic(match accels.len() {
                        0 => "this VM has no accelerator; start it with --accel SIZE".to_string(),
                        n => format!(
                            "this VM has no accelerator {instance}: it has {n} (0 to {})",
                            n - 1
                        ),
                    })
                })?;
                serde_json::to_value(a.info()).unwrap_or(Value::Null)
            }
            "quit" => {
                self.request_quit();
                return Ok(Reply::empty().and_close());
            }
            _ => return Err(QmpError::command_not_found(command)),
        };
        Ok(v.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::ErrorClass;
    use crate::vmm::VmmConfig;
    use ferry_migration::compat::Global;
    use ferry_migration::engine::stats::{ChannelStats, MultifdStats};
    use ferry_migration::wire::Compression;

    /// A paused soft VM (no guest thread to keep a core busy) and its QMP commands.
    fn control(globals: &[(&str, &str)]) -> Arc<Control> {
        let vmm = Vmm::new(&VmmConfig {
            mem_size: 16 << 20,
            dirty_size: 1 << 20,
            paused: true,
            globals: globals
                .iter()
                .map(|(p, v)| Global {
                    driver: "migration".into(),
                    property: (*p).into(),
                    value: (*v).into(),
                })
                .collect(),
            ..VmmConfig::default()
        })
        .unwrap();
        Control::new(vmm)
    }

    fn run(c: &Control, command: &str, args: Value) -> Result<Value, QmpError> {
        let args = match args {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        c.execute(command, args).map(|r| r.value)
    }

    fn ok(c: &Control, command: &str, args: Value) -> Value {
        run(c, command, args).unwrap_or_else(|e| panic!("{command}: {}", e.desc))
    }

    /// The command fails with a `GenericError` containing each of `needles`.
    fn refused(c: &Control, command: &str, args: Value, needles: &[&str]) -> String {
        let e = run(c, command, args.clone()).expect_err(&format!("{command} {args} succeeded"));
        assert_eq!(e.class, ErrorClass::GenericError, "{}", e.desc);
        for n in needles {
            assert!(e.desc.contains(n), "{:?} lacks {n:?}", e.desc);
        }
        e.desc
    }

    fn multifd_cap(c: &Control) -> bool {
        let caps = ok(c, "query-migrate-capabilities", Value::Null);
        let cap = caps
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["capability"] == "multifd")
            .unwrap_or_else(|| panic!("no multifd in {caps}"));
        cap["state"].as_bool().unwrap()
    }

    fn set_multifd(c: &Control, on: bool) -> Result<Value, QmpError> {
        run(
            c,
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "multifd", "state": on }] }),
        )
    }

    fn params(c: &Control) -> Value {
        ok(c, "query-migrate-parameters", Value::Null)
    }

    fn cap(c: &Control, name: &str) -> bool {
        let caps = ok(c, "query-migrate-capabilities", Value::Null);
        caps.as_array()
            .unwrap()
            .iter()
            .find(|c| c["capability"] == name)
            .unwrap_or_else(|| panic!("no {name} in {caps}"))["state"]
            .as_bool()
            .unwrap()
    }

    #[test]
    fn auto_converge_and_dirty_limit_are_capabilities_one_at_a_time() {
        let c = control(&[]);
        assert!(!cap(&c, "auto-converge") && !cap(&c, "dirty-limit"));
        let set = |name: &str, on: bool| {
            run(
                &c,
                "migrate-set-capabilities",
                json!({ "capabilities": [{ "capability": name, "state": on }] }),
            )
        };
        set("auto-converge", true).unwrap();
        assert!(cap(&c, "auto-converge"));
        assert!(c.vmm.params().auto_converge);
        let e = set("dirty-limit", true).unwrap_err();
        assert!(e.desc.contains("cannot both be on"), "{}", e.desc);
        assert!(!cap(&c, "dirty-limit"), "refused, yet changed");
        set("auto-converge", false).unwrap();
        set("dirty-limit", true).unwrap();
        assert!(cap(&c, "dirty-limit") && !cap(&c, "auto-converge"));
        // Both at once in one request is refused whole.
        let e = run(
            &c,
            "migrate-set-capabilities",
            json!({ "capabilities": [
                { "capability": "auto-converge", "state": true },
                { "capability": "dirty-limit", "state": true }
            ] }),
        )
        .unwrap_err();
        assert!(e.desc.contains("cannot both be on"), "{}", e.desc);
    }

    #[test]
    fn throttle_parameters_are_checked_with_qemus_wording_and_shown() {
        let c = control(&[]);
        for (k, v, range) in [
            ("cpu-throttle-initial", 0, "1 to 99"),
            ("cpu-throttle-initial", 100, "1 to 99"),
            ("cpu-throttle-increment", 100, "1 to 99"),
            ("max-cpu-throttle", 120, "1 to 99"),
            ("throttle-trigger-threshold", 101, "1 to 100"),
            ("x-vcpu-dirty-limit-period", 0, "1 to 1000"),
        ] {
            refused(
                &c,
                "migrate-set-parameters",
                json!({ k: v }),
                &[&format!(
                    "Parameter '{k}' expects an integer in the range of {range}"
                )],
            );
        }
        refused(
            &c,
            "migrate-set-parameters",
            json!({ "vcpu-dirty-limit": -1 }),
            &["Invalid parameter type for 'vcpu-dirty-limit', expected: integer"],
        );
        refused(
            &c,
            "migrate-set-parameters",
            json!({ "x-ferry-timeout-strategy": "wait" }),
            &["does not accept value 'wait'", "cancel, switchover"],
        );
        ok(
            &c,
            "migrate-set-parameters",
            json!({ "cpu-throttle-initial": 30, "max-cpu-throttle": 80, "vcpu-dirty-limit": 5,
                    "cpu-throttle-tailslow": true, "x-ferry-timeout": 60,
                    "x-ferry-timeout-strategy": "switchover" }),
        );
        let p = params(&c);
        assert_eq!(p["cpu-throttle-initial"], 30, "{p}");
        assert_eq!(p["max-cpu-throttle"], 80, "{p}");
        assert_eq!(p["vcpu-dirty-limit"], 5, "{p}");
        assert_eq!(p["cpu-throttle-tailslow"], true, "{p}");
        assert_eq!(p["x-ferry-timeout"], 60, "{p}");
        assert_eq!(p["x-ferry-timeout-strategy"], "switchover", "{p}");
        // The defaults left alone.
        assert_eq!(p["cpu-throttle-increment"], 10, "{p}");
        assert_eq!(p["x-vcpu-dirty-limit-period"], 1000, "{p}");
    }

    #[test]
    fn multifd_is_on_with_two_channels_by_default() {
        let c = control(&[]);
        assert!(multifd_cap(&c));
        let p = params(&c);
        assert_eq!(p["multifd-channels"], 2, "{p}");
        assert_eq!(p["multifd-compression"], "none", "{p}");
        assert_eq!(p["multifd-zstd-level"], 1, "{p}");
        assert_eq!(c.vmm.params().multifd_channels, 2);
    }

    #[test]
    fn the_capability_switches_channels_off_and_back_on_keeping_the_count() {
        let c = control(&[]);
        set_multifd(&c, false).unwrap();
        assert!(!multifd_cap(&c));
        assert_eq!(
            c.vmm.params().multifd_channels,
            0,
            "pages on the main channel"
        );
        assert_eq!(params(&c)["multifd-channels"], 2, "the count is kept");

        // A count set while multifd is off waits for it.
        ok(
            &c,
            "migrate-set-parameters",
            json!({ "multifd-channels": 4 }),
        );
        assert_eq!(params(&c)["multifd-channels"], 4);
        assert_eq!(c.vmm.params().multifd_channels, 0);
        assert!(!multifd_cap(&c));

        set_multifd(&c, true).unwrap();
        assert!(multifd_cap(&c));
        assert_eq!(c.vmm.params().multifd_channels, 4);
        ok(
            &c,
            "migrate-set-parameters",
            json!({ "multifd-channels": 16 }),
        );
        assert_eq!(c.vmm.params().multifd_channels, 16);
        // Asking for the state it has is fine too, as are the fixed capabilities.
        ok(
            &c,
            "migrate-set-capabilities",
            json!({ "capabilities": [
                { "capability": "events", "state": true },
                { "capability": "multifd", "state": true },
            ] }),
        );
        assert_eq!(c.vmm.params().multifd_channels, 16);
    }

    #[test]
    fn a_global_of_zero_channels_is_the_capability_off() {
        let c = control(&[("multifd-channels", "0")]);
        assert!(!multifd_cap(&c));
        // QEMU's default count, for when the capability comes on.
        assert_eq!(params(&c)["multifd-channels"], 2);
        set_multifd(&c, true).unwrap();
        assert_eq!(c.vmm.params().multifd_channels, 2);

        let c = control(&[("multifd-channels", "8"), ("multifd-compression", "zstd")]);
        assert!(multifd_cap(&c));
        let p = params(&c);
        assert_eq!(
            (&p["multifd-channels"], &p["multifd-compression"]),
            (&json!(8), &json!("zstd"))
        );
    }

    #[test]
    fn compression_and_its_level() {
        let c = control(&[]);
        ok(
            &c,
            "migrate-set-parameters",
            json!({ "multifd-compression": "zstd", "multifd-zstd-level": 19 }),
        );
        let p = params(&c);
        assert_eq!(p["multifd-compression"], "zstd", "{p}");
        assert_eq!(p["multifd-zstd-level"], 19, "{p}");
        let mp = c.vmm.params();
        assert_eq!(
            (mp.multifd_compression, mp.multifd_zstd_level),
            (Compression::Zstd, 19)
        );
        ok(
            &c,
            "migrate-set-parameters",
            json!({ "multifd-compression": "none" }),
        );
        assert_eq!(c.vmm.params().multifd_compression, Compression::None);
    }

    #[test]
    fn multifd_values_out_of_range_are_refused_with_qemus_wording() {
        let c = control(&[]);
        let before = params(&c);
        for n in [0, 17] {
            refused(
                &c,
                "migrate-set-parameters",
                json!({ "multifd-channels": n }),
                &["Parameter 'multifd-channels' expects a value between 1 and 16"],
            );
        }
        for n in [0, 20] {
            refused(
                &c,
                "migrate-set-parameters",
                json!({ "multifd-zstd-level": n }),
                &["Parameter 'multifd-zstd-level' expects a value between 1 and 19"],
            );
        }
        for method in ["zlib", "qpl", "ZSTD", ""] {
            refused(
                &c,
                "migrate-set-parameters",
                json!({ "multifd-compression": method }),
                &[
                    &format!("Parameter 'multifd-compression' does not accept value '{method}'"),
                    "none, zstd",
                ],
            );
        }
        refused(
            &c,
            "migrate-set-parameters",
            json!({ "multifd-channels": "4" }),
            &["Invalid parameter type for 'multifd-channels', expected: integer"],
        );
        refused(
            &c,
            "migrate-set-parameters",
            json!({ "multifd-channels": -1 }),
            &["expected: integer"],
        );
        refused(
            &c,
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "multifd", "state": 1 }] }),
            &["Invalid parameter type for 'capabilities[0].state', expected: boolean"],
        );
        // All or nothing: the good values beside a bad one are not applied.
        refused(
            &c,
            "migrate-set-parameters",
            json!({ "downtime-limit": 1234, "multifd-channels": 4, "multifd-compression": "lz4" }),
            &["'lz4'"],
        );
        refused(
            &c,
            "migrate-set-capabilities",
            json!({ "capabilities": [
                { "capability": "multifd", "state": false },
                { "capability": "xbzrle", "state": true },
            ] }),
            &["'xbzrle'"],
        );
        assert_eq!(params(&c), before);
        assert!(multifd_cap(&c));
    }

    #[test]
    fn multifd_settings_wait_for_the_running_migration_to_end() {
        let c = control(&[]);
        // What `migrating` sees while a migration runs, either way.
        c.vmm.monitor().force_status(MigrationStatus::Active);
        refused(
            &c,
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "multifd", "state": false }] }),
            &["migration process in progress"],
        );
        for (k, v) in [
            ("multifd-channels", json!(4)),
            ("multifd-compression", json!("zstd")),
            ("multifd-zstd-level", json!(3)),
        ] {
            let mut args = Map::new();
            args.insert(k.into(), v);
            args.insert("downtime-limit".into(), json!(1000));
            refused(
                &c,
                "migrate-set-parameters",
                Value::Object(args),
                &["migration process in progress", k, "next migration"],
            );
        }
        assert_eq!(params(&c)["downtime-limit"], 300, "nothing applied");
        assert!(c.vmm.set_multifd(false).is_err());
        assert!(c
            .vmm
            .set_migration_property("multifd-compression", "zstd")
            .is_err());
        // The downtime limit still reaches a migration in flight, as in QEMU.
        ok(
            &c,
            "migrate-set-parameters",
            json!({ "downtime-limit": 1000 }),
        );
        assert_eq!(
            c.vmm.monitor().downtime_limit(),
            Some(Duration::from_secs(1))
        );

        c.vmm.monitor().force_status(MigrationStatus::Completed);
        set_multifd(&c, false).unwrap();
        ok(
            &c,
            "migrate-set-parameters",
            json!({ "multifd-channels": 4, "multifd-compression": "zstd" }),
        );
        assert_eq!(params(&c)["multifd-channels"], 4);
    }

    #[test]
    fn query_migrate_names_the_data_channels_figures_as_qemu_and_ferry_do() {
        let c = control(&[]);
        c.vmm.monitor().update(|i| {
            i.status = MigrationStatus::Completed;
            i.ram.transferred = 10_300;
            i.ram.multifd_bytes = 10_000;
            i.multifd = Some(MultifdStats {
                channels: 2,
                compression: "zstd".into(),
                syncs: 3,
                per_channel: vec![
                    ChannelStats {
                        packets: 2,
                        pages: 5,
                        zero_pages: 1,
                        bytes: 6_000,
                    },
                    ChannelStats {
                        packets: 1,
                        pages: 4,
                        zero_pages: 0,
                        bytes: 4_000,
                    },
                ],
                raw_bytes: 32_768,
                wire_bytes: 10_000,
                strays: Vec::new(),
            });
        });
        let q = ok(&c, "query-migrate", Value::Null);
        assert_eq!(q["ram"]["multifd-bytes"], 10_000, "{q}");
        let m = &q["multifd"];
        assert_eq!(m["channels"], 2, "{q}");
        assert_eq!(m["compression"], "zstd", "{q}");
        assert_eq!(m["raw-bytes"], 32_768, "{q}");
        assert_eq!(m["wire-bytes"], 10_000, "{q}");
        assert_eq!(m["per-channel"][1]["zero-pages"], 0, "{q}");
        assert_eq!(m["per-channel"][0]["bytes"], 6_000, "{q}");
    }
}
