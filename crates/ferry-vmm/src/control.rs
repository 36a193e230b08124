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
use ferry_migration::compat::PropKind;
use ferry_migration::engine::{error_chain, MigrationStatus, MIGRATION_DRIVER};

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
            return json!({});
        }
        serde_json::to_value(&info).unwrap_or_else(|_| json!({}))
    }

    fn query_params(&self) -> Value {
        let p = self.vmm.params();
        json!({
            "downtime-limit": p.downtime_limit.as_millis() as u64,
            "max-bandwidth": p.max_bandwidth,
            "multifd-channels": 1,
            "multifd-compression": "none",
            "verify-full": p.verify_full,
            "digest": p.digest,
        })
    }

    /// `migrate-set-parameters`: checks every argument, then applies them all.
    fn set_params(&self, args: &Map<String, Value>) -> Result<(), QmpError> {
        let current = self.vmm.params();
        let mut changes = Vec::new();
        for (k, v) in args {
            match k.as_str() {
                "downtime-limit" | "max-bandwidth" => {
                    let n = uint_value(k, v)?;
                    check_range(k, n)?;
                    changes.push((k.as_str(), n.to_string()));
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
                    if uint_value(k, v)? != 1 {
                        return Err(QmpError::generic(format!(
                            "Parameter 'multifd-channels' expects 1: {NO_MULTIFD}"
                        )));
                    }
                }
                "multifd-compression" => {
                    let c = str_value(k, v)?;
                    if c != "none" {
                        return Err(QmpError::generic(format!(
                            "Parameter 'multifd-compression' does not accept value '{c}': \
                             {NO_MULTIFD}, so 'none' is the only value"
                        )));
                    }
                }
                _ => {
                    return Err(QmpError::generic(format!(
                        "Parameter '{k}' is unexpected; the migration parameters ferry has are {}",
                        PARAMETERS.join(", ")
                    )))
                }
            }
        }
        for (k, v) in changes {
            self.vmm.set_migration_property(k, &v).map_err(vmm_err)?;
        }
        Ok(())
    }

    fn migrating(&self) -> bool {
        matches!(
            self.vmm.monitor().status(),
            MigrationStatus::Setup
                | MigrationStatus::Active
                | MigrationStatus::Device
                | MigrationStatus::Cancelling
        )
    }

    /// `migrate-set-capabilities`: every capability ferry has is fixed, so this checks
    /// that the request asks for what is, and says why when it does not.
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
        if self.migrating() {
            return Err(QmpError::generic(
                "There's a migration process in progress; capabilities cannot change until it ends",
            ));
        }
        for (cap, state) in wanted {
            if state != cap.state {
                return Err(QmpError::generic(format!(
                    "Capability '{}' cannot be {}: {}",
                    cap.name,
                    if state { "enabled" } else { "disabled" },
                    cap.why
                )));
            }
        }
        Ok(())
    }
}

/// A migration capability QEMU names, as ferry has it: its state cannot change.
struct Capability {
    name: &'static str,
    state: bool,
    /// Why the state is fixed, for the error when asked to change it.
    why: &'static str,
}

const NO_MULTIFD: &str = "this release of ferry has no multifd; a migration uses one channel";

/// What `query-migrate-capabilities` reports, in this order.
const CAPABILITIES: [Capability; 6] = [
    Capability {
        name: "events",
        state: true,
        why: "ferry always sends MIGRATION and MIGRATION_PASS events",
    },
    Capability {
        name: "return-path",
        state: true,
        why: "ferry's source relies on the destination's return path to learn that the \
              guest runs there, or why it refused or failed",
    },
    Capability {
        name: "multifd",
        state: false,
        why: NO_MULTIFD,
    },
    Capability {
        name: "postcopy-ram",
        state: false,
        why: "this release of ferry has no postcopy; migration is precopy only",
    },
    Capability {
        name: "auto-converge",
        state: false,
        why: "this release of ferry does not throttle vCPUs; raise downtime-limit or \
              max-bandwidth for a guest that dirties memory faster than it can be sent",
    },
    Capability {
        name: "xbzrle",
        state: false,
        why: "this release of ferry has no XBZRLE; it sends zero pages as a flag and \
              every other page whole",
    },
];

/// What `migrate-set-parameters` knows, for the error about one it does not.
const PARAMETERS: [&str; 6] = [
    "downtime-limit",
    "max-bandwidth",
    "multifd-channels",
    "multifd-compression",
    "verify-full",
    "digest",
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
                "x-ferry-accel"
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
                vmm.cancel_migration();
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
                CAPABILITIES
                    .iter()
                    .map(|c| json!({ "capability": c.name, "state": c.state }))
                    .collect()
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
                no_args(command, &args)?;
                let info = vmm.vm().accel().ok_or_else(|| {
                    QmpError::generic(
                        "this VM has no accelerator; start it with --accel SIZE on the KVM backend",
                    )
                })?;
                serde_json::to_value(info).unwrap_or(Value::Null)
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
