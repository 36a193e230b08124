//! The VM's QMP commands: what `ferry run --qmp` answers.
//!
//! Names, arguments and replies follow QEMU's where the meaning is the same, so QMP
//! clients written for QEMU (libvirt, `qemu.qmp`, `qmp-shell`) work unchanged for what
//! ferry implements. ferry's own additions start with `x-ferry-`.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::qmp::{version_info, QmpError, QmpHandler, QmpServer, Reply};
use crate::vmm::{RunState, Vmm, VmmError, VmmEvent};
use ferry_migration::engine::{error_chain, MigrationStatus};

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
        self.vmm.set_event_sink(move |e| {
            let (name, data) = match e {
                VmmEvent::Migration(s) => ("MIGRATION", json!({ "status": s.as_str() })),
                VmmEvent::MigrationPass(p) => ("MIGRATION_PASS", json!({ "pass": p })),
                VmmEvent::Stop => ("STOP", Value::Null),
                VmmEvent::Resume => ("RESUME", Value::Null),
            };
            events.emit(name, data);
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
            "verify-full": p.verify_full,
            "digest": p.digest,
        })
    }

    fn set_params(&self, args: &Map<String, Value>) -> Result<(), QmpError> {
        for (k, v) in args {
            let text = match v {
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
                Value::String(s) => s.clone(),
                _ => {
                    return Err(QmpError::generic(format!(
                        "parameter '{k}' expects a number, a boolean or a string"
                    )))
                }
            };
            self.vmm.set_migration_property(k, &text).map_err(vmm_err)?;
        }
        Ok(())
    }
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
                json!({ "status": s.as_str(), "running": s == RunState::Running, "singlestep": false })
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
                for k in args.keys() {
                    if !matches!(k.as_str(), "uri" | "detach" | "blk" | "inc") {
                        return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
                    }
                }
                vmm.migrate(str_arg(&args, "uri")?).map_err(vmm_err)?;
                json!({})
            }
            "migrate-incoming" => {
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
            "query-migrate-parameters" => self.query_params(),
            "migrate-set-parameters" => {
                self.set_params(&args)?;
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
