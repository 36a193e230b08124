//! One running VM and its migrations: what the control socket and the CLI act on.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ferry_migration::compat::{Config, Global, Registry};
use ferry_migration::engine::{
    self, error_chain, DestinationIdentity, Handover, MigrationError, MigrationEvent,
    MigrationInfo, MigrationMonitor, MigrationParams, MigrationStatus, SourceIdentity, MIGRATION,
};
use thiserror::Error;

use crate::guest::GuestVm;
use crate::machine::{self, RELEASE};
use crate::soft::{SoftConfig, SoftVm};
use crate::tls::{TlsAcceptor, TlsCreds, TlsDialer, TlsError};
use crate::transport::{Listener, MigrationUri};

/// Which hypervisor runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Soft,
    Kvm,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Self::Soft => "soft",
            Self::Kvm => "kvm",
        }
    }
}

/// How to build a VM.
#[derive(Debug, Clone)]
pub struct VmmConfig {
    pub backend: Backend,
    pub machine: String,
    pub globals: Vec<Global>,
    pub mem_size: u64,
    pub vcpus: usize,
    pub dirty_size: u64,
    /// Each vCPU's work, one per vCPU, instead of `dirty_size` for all; empty for none.
    pub vcpu_work: Vec<crate::guest::VcpuWork>,
    pub dirty_rate: u64,
    /// KVM: track dirty pages with the dirty ring when KVM offers it (else the bitmap).
    pub dirty_ring: bool,
    pub fill: u64,
    /// Create the VM stopped, waiting for an incoming migration.
    pub incoming: bool,
    /// Start the guest stopped (QEMU's `-S`).
    pub paused: bool,
    /// Accelerators, in order ([`crate::devices::accel`]); empty for none.
    pub accels: Vec<crate::devices::accel::AccelConfig>,
}

impl Default for VmmConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Soft,
            machine: "ferry".into(),
            globals: Vec::new(),
            mem_size: 256 << 20,
            vcpus: 1,
            dirty_size: 16 << 20,
            vcpu_work: Vec::new(),
            dirty_rate: 0,
            dirty_ring: true,
            fill: 0,
            incoming: false,
            paused: false,
            accels: Vec::new(),
        }
    }
}

#[derive(Debug, Error)]
pub enum VmmError {
    #[error(transparent)]
    Compat(#[from] ferry_migration::compat::CompatError),
    #[error("cannot create the VM")]
    Vm(#[source] ferry_migration::engine::vm::VmError),
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error(transparent)]
    Uri(#[from] crate::transport::UriError),
    #[error("cannot listen on {uri}")]
    Listen {
        uri: String,
        #[source]
        source: std::io::Error,
    },
    #[error("a migration is already in progress; wait for it or cancel it with migrate_cancel")]
    Busy,
    #[error("{0}")]
    State(String),
    #[error(transparent)]
    Kvm(crate::kvm::KvmError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// TLS for this VM's migrations, as QEMU's `tls-creds`, `tls-hostname` and `tls-authz`
/// migration parameters say it: with credentials, every migration in or out is TLS
/// with mutual authentication, and nothing else is taken or offered.
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// The credentials directory (see [`crate::tls::TlsCreds`]); `None`: plaintext.
    pub creds: Option<std::path::PathBuf>,
    /// The name the source checks in the destination's certificate; `None`: the host
    /// of the migration address.
    pub hostname: Option<String>,
    /// The client identities allowed to migrate into this VM; `None`: any the CA vouches for.
    pub authz: Option<Vec<String>>,
}

/// What a user reads when a guest's handover is in doubt, and what to do.
pub const IN_DOUBT_ADVICE: &str = "the guest was handed to the destination and no answer came \
    back, so it may be running there; it stays stopped here. Check the destination: if it \
    runs the guest, quit this VM; if it does not, take the guest back here with QMP \
    x-ferry-reclaim (ferry reclaim --qmp PATH)";

/// Whether the KVM backend can run here; the error says why not.
pub fn kvm_usable() -> Result<(), VmmError> {
    crate::kvm::kvm_usable().map_err(VmmError::Kvm)
}

/// What `query-status` says, in QEMU's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    /// Waiting for or receiving an incoming migration.
    InMigrate,
    /// The guest moved away; this VM will not run it again.
    PostMigrate,
    /// An incoming migration failed; the guest cannot run here.
    FailedIncoming,
    /// The guest was handed to a destination that never answered: it may run there, so
    /// it stays stopped here until someone who checked takes it back
    /// ([`Vmm::reclaim`]). `was_running`: what `reclaim` returns it to.
    HandoverInDoubt {
        was_running: bool,
    },
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::InMigrate => "inmigrate",
            Self::PostMigrate => "postmigrate",
            Self::FailedIncoming => "inmigrate-failed",
            Self::HandoverInDoubt { .. } => "handover-in-doubt",
        }
    }
}

/// Events a control socket forwards to its clients.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmEvent {
    Migration(MigrationStatus),
    MigrationPass(u32),
    /// Who may run the guest changed (see [`Handover`]).
    Handover(Handover),
    /// The outgoing migration stopped converging (`why`, with the figures) or
    /// converges again.
    Convergence {
        converging: bool,
        why: Option<String>,
    },
    Stop,
    Resume,
}

type EventSink = Arc<dyn Fn(VmmEvent) + Send + Sync>;

/// A VM with its configuration and migration machinery.
pub struct Vmm {
    vm: Arc<dyn GuestVm>,
    config: Config,
    registry: Registry,
    params: Mutex<MigrationParams>,
    /// The data channel count QMP's `multifd-channels` shows: the migration's while
    /// pages travel on data channels, and the one they come back with while the
    /// `multifd` capability is off (`params` then says 0), as QEMU keeps the parameter
    /// apart from the capability. Locked after `params`, when both are.
    multifd_channels: Mutex<u16>,
    monitor: Arc<MigrationMonitor>,
    worker: Mutex<Option<JoinHandle<()>>>,
    state: Mutex<RunState>,
    events: Mutex<Option<EventSink>>,
    /// The migration under way (or last) is outgoing: this VM is its source.
    outgoing: std::sync::atomic::AtomicBool,
    /// TLS settings; the destination's acceptor reads `authz` at each handshake.
    tls: Arc<Mutex<TlsSettings>>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("backend", &self.vm.backend())
            .field("machine", &self.config.machine())
            .finish_non_exhaustive()
    }
}

impl Vmm {
    pub fn new(cfg: &VmmConfig) -> Result<Arc<Self>, VmmError> {
        let registry = machine::registry();
        let config = registry.configure(&cfg.machine, &cfg.globals)?;
        let params = MigrationParams::from_config(&config)?;
        let multifd_channels = match params.multifd_channels {
            0 => MigrationParams::default().multifd_channels,
            n => n,
        };
        let vm: Arc<dyn GuestVm> = match cfg.backend {
            Backend::Soft => Arc::new(
                SoftVm::create(&SoftConfig {
                    mem_size: cfg.mem_size,
                    vcpus: cfg.vcpus,
                    dirty_size: cfg.dirty_size,
                    vcpu_work: cfg.vcpu_work.clone(),
                    dirty_rate: cfg.dirty_rate,
                    fill: cfg.fill,
                    incoming: cfg.incoming,
                    paused: cfg.paused,
                    accels: cfg.accels.clone(),
                    ..SoftConfig::default()
                })
                .map_err(VmmError::Vm)?,
            ),
            Backend::Kvm => {
                let vm = crate::kvm::KvmVm::create(&crate::kvm::KvmConfig {
                    mem_size: cfg.mem_size,
                    vcpus: cfg.vcpus,
                    dirty_size: cfg.dirty_size,
                    vcpu_work: cfg.vcpu_work.clone(),
                    dirty_rate: cfg.dirty_rate,
                    fill: cfg.fill,
                    incoming: cfg.incoming,
                    accels: cfg.accels.clone(),
                    dirty_ring: cfg.dirty_ring,
                })
                .map_err(VmmError::Kvm)?;
                if !cfg.incoming && !cfg.paused {
                    vm.start().map_err(VmmError::Kvm)?;
                }
                Arc::new(vm)
            }
        };
        let state = if cfg.incoming {
            RunState::InMigrate
        } else if cfg.paused {
            RunState::Paused
        } else {
            RunState::Running
        };
        let vmm = Arc::new(Self {
            vm,
            config,
            registry,
            params: Mutex::new(params),
            multifd_channels: Mutex::new(multifd_channels),
            monitor: Arc::new(MigrationMonitor::new()),
            worker: Mutex::new(None),
            state: Mutex::new(state),
            events: Mutex::new(None),
            outgoing: std::sync::atomic::AtomicBool::new(false),
            tls: Arc::new(Mutex::new(TlsSettings::default())),
        });
        let weak = Arc::downgrade(&vmm);
        vmm.monitor.set_listener(move |e| {
            if let Some(v) = weak.upgrade() {
                // The engine hands the guest over before it reports the migration
                // completed: from that moment this source is post-migrate, so nobody who
                // sees `completed` can still read `running` here.
                if *e == MigrationEvent::Handover(Handover::Destination)
                    && v.outgoing.load(std::sync::atomic::Ordering::SeqCst)
                {
                    v.set_state(RunState::PostMigrate);
                }
                v.emit(match e {
                    MigrationEvent::Status(s) => VmmEvent::Migration(*s),
                    MigrationEvent::Pass(p) => VmmEvent::MigrationPass(*p),
                    MigrationEvent::Handover(h) => VmmEvent::Handover(*h),
                    MigrationEvent::Convergence { converging, why } => VmmEvent::Convergence {
                        converging: *converging,
                        why: why.clone(),
                    },
                    _ => return,
                });
            }
        });
        Ok(vmm)
    }

    /// Sends events to `f` (one sink; a later call replaces it).
    pub fn set_event_sink(&self, f: impl Fn(VmmEvent) + Send + Sync + 'static) {
        *self.events.lock().unwrap() = Some(Arc::new(f));
    }

    fn emit(&self, e: VmmEvent) {
        let sink = self.events.lock().unwrap().clone();
        if let Some(s) = sink {
            s(e);
        }
    }

    pub fn vm(&self) -> &Arc<dyn GuestVm> {
        &self.vm
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn run_state(&self) -> RunState {
        *self.state.lock().unwrap()
    }

    fn set_state(&self, s: RunState) {
        *self.state.lock().unwrap() = s;
    }

    pub fn params(&self) -> MigrationParams {
        self.params.lock().unwrap().clone()
    }

    pub fn set_params(&self, p: MigrationParams) {
        let mut cur = self.params.lock().unwrap();
        if p.multifd_channels > 0 {
            *self.multifd_channels.lock().unwrap() = p.multifd_channels;
        }
        *cur = p;
    }

    /// Whether the next migration sends pages on data channels (QMP's `multifd`
    /// capability), and over how many it does or would (`multifd-channels`).
    pub fn multifd(&self) -> (bool, u16) {
        let p = self.params.lock().unwrap();
        let n = *self.multifd_channels.lock().unwrap();
        (p.multifd_channels > 0, n)
    }

    /// Sends the next migration's pages on data channels, or on the main channel
    /// (QMP `migrate-set-capabilities` `multifd`).
    pub fn set_multifd(&self, on: bool) -> Result<(), VmmError> {
        self.check_idle("multifd")?;
        let mut p = self.params.lock().unwrap();
        p.multifd_channels = if on {
            *self.multifd_channels.lock().unwrap()
        } else {
            0
        };
        Ok(())
    }

    /// Whether a migration, either way, is under way.
    pub fn migrating(&self) -> bool {
        matches!(
            self.monitor.status(),
            MigrationStatus::Setup
                | MigrationStatus::Active
                | MigrationStatus::Device
                | MigrationStatus::Cancelling
        )
    }

    /// Refuses to change `what`, which a migration fixes at its start, while one runs.
    fn check_idle(&self, what: &str) -> Result<(), VmmError> {
        if self.migrating() {
            return Err(VmmError::State(format!(
                "a migration is in progress; {what} applies to the next migration and cannot \
                 change until this one ends"
            )));
        }
        Ok(())
    }

    pub fn monitor(&self) -> &Arc<MigrationMonitor> {
        &self.monitor
    }

    pub fn query_migrate(&self) -> MigrationInfo {
        self.monitor.info()
    }

    /// What stops `stop` or `cont` while a migration is in its switchover: the guest is
    /// the engine's to stop and to resume then.
    fn in_switchover(&self, command: &str) -> Result<(), VmmError> {
        if self.monitor.status() != MigrationStatus::Device {
            return Ok(());
        }
        let what = match self.monitor.handover() {
            Handover::Source => {
                "the guest is stopped for the switchover of the migration in progress; \
                 migrate_cancel stops the migration and resumes the guest here"
            }
            _ => {
                "the switchover is committed: the destination has the end of stream and \
                 decides now; the guest resumes here by itself only if the destination \
                 fails to load it"
            }
        };
        Err(VmmError::State(format!("{command} is refused: {what}")))
    }

    /// Stops the guest (QMP `stop`).
    pub fn stop(&self) -> Result<(), VmmError> {
        self.in_switchover("stop")?;
        match self.run_state() {
            RunState::Running => {
                self.vm.pause().map_err(VmmError::Vm)?;
                self.set_state(RunState::Paused);
                self.emit(VmmEvent::Stop);
                Ok(())
            }
            RunState::Paused => Ok(()),
            s => Err(VmmError::State(format!(
                "the VM is {}; stop applies to a running VM",
                s.as_str()
            ))),
        }
    }

    /// Resumes the guest (QMP `cont`).
    pub fn cont(&self) -> Result<(), VmmError> {
        self.in_switchover("cont")?;
        match self.run_state() {
            RunState::Paused => {
                self.vm.resume().map_err(VmmError::Vm)?;
                self.set_state(RunState::Running);
                self.emit(VmmEvent::Resume);
                Ok(())
            }
            RunState::Running => Ok(()),
            RunState::HandoverInDoubt { .. } => Err(VmmError::State(IN_DOUBT_ADVICE.into())),
            s => Err(VmmError::State(format!(
                "the VM is {}; its guest cannot run here (cont applies to a paused VM)",
                s.as_str()
            ))),
        }
    }

    /// Takes back a guest whose handover is in doubt, after the user has checked that
    /// the destination does not run it (QMP `x-ferry-reclaim`): the guest runs here
    /// again if it ran before the migration.
    pub fn reclaim(&self) -> Result<(), VmmError> {
        let RunState::HandoverInDoubt { was_running } = self.run_state() else {
            return Err(VmmError::State(format!(
                "the VM is {}; x-ferry-reclaim takes back a guest whose handover is in doubt, and this one's is not",
                self.run_state().as_str()
            )));
        };
        if was_running {
            self.vm.resume().map_err(VmmError::Vm)?;
            self.set_state(RunState::Running);
            self.emit(VmmEvent::Resume);
        } else {
            self.set_state(RunState::Paused);
        }
        tracing::warn!("guest taken back after a handover in doubt");
        Ok(())
    }

    fn wire_props(&self) -> Vec<(String, String)> {
        self.config.wire_properties()
    }

    /// Wire properties whose value the machine type's compat tables set.
    fn compat_pinned(&self) -> Vec<String> {
        self.config.compat_pinned_wire_properties()
    }

    fn claim_worker(&self) -> Result<std::sync::MutexGuard<'_, Option<JoinHandle<()>>>, VmmError> {
        let mut w = self.worker.lock().unwrap();
        if let Some(h) = w.as_ref() {
            if !h.is_finished() {
                return Err(VmmError::Busy);
            }
        }
        if let Some(h) = w.take() {
            let _ = h.join();
        }
        Ok(w)
    }

    /// The TLS settings.
    pub fn tls(&self) -> TlsSettings {
        self.tls.lock().unwrap().clone()
    }

    /// Sets the credentials directory (`None` or an empty path: plaintext). The
    /// directory is read now, so a wrong one is refused here rather than at migration.
    pub fn set_tls_creds(&self, dir: Option<std::path::PathBuf>) -> Result<(), VmmError> {
        let dir = dir.filter(|d| !d.as_os_str().is_empty());
        if let Some(d) = &dir {
            TlsCreds::load(d)?;
        }
        self.check_idle("tls-creds")?;
        self.tls.lock().unwrap().creds = dir;
        Ok(())
    }

    pub fn set_tls_hostname(&self, name: Option<String>) {
        self.tls.lock().unwrap().hostname = name.filter(|n| !n.is_empty());
    }

    /// Sets the identities allowed in, from a comma-separated list (empty: any).
    pub fn set_tls_authz(&self, list: &str) {
        let ids: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        self.tls.lock().unwrap().authz = (!ids.is_empty()).then_some(ids);
    }

    /// How the source reaches `uri`: plainly, or with TLS when credentials are set.
    fn connector(&self, uri: MigrationUri) -> Result<Box<dyn engine::Connector>, VmmError> {
        let tls = self.tls();
        let Some(dir) = tls.creds else {
            return Ok(Box::new(uri));
        };
        let creds = TlsCreds::load(&dir)?;
        Ok(Box::new(TlsDialer::new(
            uri,
            &creds,
            tls.hostname.as_deref(),
            self.params().handshake_timeout,
        )?))
    }

    /// Starts migrating the guest to `uri` in the background (QMP `migrate`).
    pub fn migrate(self: &Arc<Self>, uri: &str) -> Result<(), VmmError> {
        let uri: MigrationUri = uri.parse()?;
        let connector = self.connector(uri.clone())?;
        match self.run_state() {
            RunState::Running | RunState::Paused => {}
            s => {
                return Err(VmmError::State(format!(
                    "the VM is {}; only a running or paused VM can migrate",
                    s.as_str()
                )))
            }
        }
        let mut w = self.claim_worker()?;
        self.outgoing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.monitor.begin();
        let me = Arc::clone(self);
        let id = SourceIdentity {
            release: RELEASE.to_string(),
            machine: self.config.machine().to_string(),
            wire_props: self.wire_props(),
            compat_pinned: self.compat_pinned(),
        };
        let params = self.params();
        *w = Some(
            std::thread::Builder::new()
                .name("ferry-migration".into())
                .spawn(move || {
                    let was_running = me.run_state() == RunState::Running;
                    match engine::migrate(me.vm.as_ref(), &id, &params, connector.as_ref(), &me.monitor) {
                        Ok(info) => {
                            me.set_state(RunState::PostMigrate);
                            if was_running {
                                me.emit(VmmEvent::Stop);
                            }
                            tracing::info!(
                                downtime_ms = info.downtime.unwrap_or(0),
                                total_ms = info.total_time,
                                "the guest now runs at {uri}"
                            );
                        }
                        Err(e) => {
                            if matches!(e, MigrationError::HandoverInDoubt { .. }) {
                                // The engine left the guest stopped: the destination may
                                // be running it (see the wire docs).
                                me.set_state(RunState::HandoverInDoubt { was_running });
                                if was_running {
                                    me.emit(VmmEvent::Stop);
                                }
                                tracing::error!(error = %error_chain(&e), "migration to {uri}: {IN_DOUBT_ADVICE}");
                            } else {
                                tracing::warn!(error = %error_chain(&e), "migration to {uri} failed; the guest keeps running here");
                            }
                        }
                    }
                })
                .map_err(|e| VmmError::State(format!("cannot start the migration thread: {e}")))?,
        );
        Ok(())
    }

    /// Cancels the running migration, if any (QMP `migrate_cancel`). A cancel that is
    /// taken is honoured: the guest stays here. Once the source has committed to the
    /// switchover, it is refused with the reason.
    pub fn cancel_migration(&self) -> Result<(), VmmError> {
        if matches!(
            self.monitor.status(),
            MigrationStatus::Setup | MigrationStatus::Active | MigrationStatus::Device
        ) {
            self.monitor
                .cancel()
                .map_err(|r| VmmError::State(format!("migrate_cancel is refused: {r}")))?;
        }
        Ok(())
    }

    /// Listens on `uri` and receives one incoming migration in the background. Returns
    /// the address actually bound. `on_done` is called with the result.
    pub fn incoming(
        self: &Arc<Self>,
        uri: &str,
        on_done: impl FnOnce(Result<MigrationInfo, MigrationError>) + Send + 'static,
    ) -> Result<MigrationUri, VmmError> {
        let uri: MigrationUri = uri.parse()?;
        if self.run_state() != RunState::InMigrate {
            return Err(VmmError::State(format!(
                "the VM is {}; only a VM started with --incoming can receive a migration",
                self.run_state().as_str()
            )));
        }
        let listener = Listener::bind(&uri).map_err(|e| VmmError::Listen {
            uri: uri.to_string(),
            source: e,
        })?;
        let bound = listener.local_uri().map_err(|e| VmmError::Listen {
            uri: uri.to_string(),
            source: e,
        })?;
        let incoming: engine::Incoming = match self.tls().creds {
            None => listener.into(),
            Some(dir) => {
                let config = TlsCreds::load(&dir)?.server_config()?;
                let tls = Arc::clone(&self.tls);
                engine::Incoming::acceptor(TlsAcceptor {
                    listener,
                    config,
                    authz: Arc::new(move || tls.lock().unwrap().authz.clone()),
                })
            }
        };
        let mut w = self.claim_worker()?;
        self.outgoing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.monitor.reset();
        let me = Arc::clone(self);
        let id = DestinationIdentity {
            release: RELEASE.to_string(),
            machine: self.config.machine().to_string(),
            known_machines: machine::machine_names(),
            wire_props: self.wire_props(),
            compat_pinned: self.compat_pinned(),
        };
        let params = self.params();
        *w = Some(
            std::thread::Builder::new()
                .name("ferry-incoming".into())
                .spawn(move || {
                    let r = engine::receive(me.vm.as_ref(), &id, &params, incoming, &me.monitor);
                    match &r {
                        Ok(_) if me.vm.is_running() => {
                            me.set_state(RunState::Running);
                            me.emit(VmmEvent::Resume);
                        }
                        Ok(_) => me.set_state(RunState::Paused),
                        Err(_) => me.set_state(RunState::FailedIncoming),
                    }
                    on_done(r);
                })
                .map_err(|e| VmmError::State(format!("cannot start the incoming thread: {e}")))?,
        );
        Ok(bound)
    }

    /// Waits for the migration worker, if any.
    pub fn join_worker(&self) {
        let h = self.worker.lock().unwrap().take();
        if let Some(h) = h {
            let _ = h.join();
        }
    }

    /// Sets a migration parameter by its property name (QMP `migrate-set-parameters`),
    /// with the property's meaning: `multifd-channels` 0 puts pages on the main channel.
    /// `downtime-limit` also applies to a migration under way; the data channels'
    /// settings cannot change while one runs; the rest apply to the next migration.
    pub fn set_migration_property(&self, prop: &str, value: &str) -> Result<(), VmmError> {
        let p = self.parse_property(prop, value)?;
        if prop.starts_with("multifd-") {
            self.check_idle(prop)?;
        }
        let mut cur = self.params.lock().unwrap();
        match prop {
            "downtime-limit" => {
                cur.downtime_limit = p.downtime_limit;
                self.monitor.set_downtime_limit(p.downtime_limit);
            }
            "max-bandwidth" => {
                cur.max_bandwidth = p.max_bandwidth;
                self.monitor.set_max_bandwidth(p.max_bandwidth);
            }
            // Convergence: a migration under way takes them at its next pass.
            "auto-converge" | "dirty-limit" | "cpu-throttle-initial" | "cpu-throttle-increment"
            | "cpu-throttle-tailslow" | "max-cpu-throttle" | "throttle-trigger-threshold"
            | "vcpu-dirty-limit" | "x-vcpu-dirty-limit-period" | "x-ferry-timeout"
            | "x-ferry-timeout-per-gib" | "x-ferry-timeout-strategy"
            | "x-ferry-switchover-ceiling" => {
                // Only the property named changes; the others keep what was set.
                let mut merged = cur.clone();
                copy_convergence_property(prop, &p, &mut merged);
                if let Some(why) = merged.conflict() {
                    return Err(VmmError::State(why));
                }
                *cur = merged;
                self.monitor.set_live_params(cur.clone());
            }
            "verify-full" => cur.verify_full = p.verify_full,
            "multifd-channels" => {
                cur.multifd_channels = p.multifd_channels;
                if p.multifd_channels > 0 {
                    *self.multifd_channels.lock().unwrap() = p.multifd_channels;
                }
            }
            "multifd-compression" => cur.multifd_compression = p.multifd_compression,
            "multifd-zstd-level" => cur.multifd_zstd_level = p.multifd_zstd_level,
            other => {
                return Err(VmmError::State(format!(
                    "migration parameter {other} cannot change at run time (it is fixed by the machine type and -global)"
                )))
            }
        }
        Ok(())
    }

    /// Sets the data channel count (QMP's `multifd-channels`, 1 or more) and keeps
    /// whether pages travel on data channels: while the `multifd` capability is off
    /// the count waits for it to come on.
    pub fn set_multifd_channels(&self, n: u16) -> Result<(), VmmError> {
        if n == 0 {
            return Err(VmmError::State(
                "multifd-channels counts data channels, 1 or more; turn the multifd \
                 capability off to send pages on the main channel"
                    .into(),
            ));
        }
        let p = self.parse_property("multifd-channels", &n.to_string())?;
        self.check_idle("multifd-channels")?;
        let mut cur = self.params.lock().unwrap();
        *self.multifd_channels.lock().unwrap() = p.multifd_channels;
        if cur.multifd_channels > 0 {
            cur.multifd_channels = p.multifd_channels;
        }
        Ok(())
    }

    /// The parameters with one migration property set to `value`, parsed through the
    /// registry so that the value gets the property's own checks.
    fn parse_property(&self, prop: &str, value: &str) -> Result<MigrationParams, VmmError> {
        // Each property is parsed against the machine type alone; the caller copies the
        // one named into the current parameters.
        let cfg = self.registry.configure(
            self.config.machine(),
            &[Global {
                driver: MIGRATION.into(),
                property: prop.into(),
                value: value.into(),
            }],
        )?;
        Ok(MigrationParams::from_config(&cfg)?)
    }
}

/// Copies the convergence property `prop` from `from` into `to`.
fn copy_convergence_property(prop: &str, from: &MigrationParams, to: &mut MigrationParams) {
    match prop {
        "auto-converge" => to.auto_converge = from.auto_converge,
        "dirty-limit" => to.dirty_limit = from.dirty_limit,
        "cpu-throttle-initial" => to.cpu_throttle_initial = from.cpu_throttle_initial,
        "cpu-throttle-increment" => to.cpu_throttle_increment = from.cpu_throttle_increment,
        "cpu-throttle-tailslow" => to.cpu_throttle_tailslow = from.cpu_throttle_tailslow,
        "max-cpu-throttle" => to.max_cpu_throttle = from.max_cpu_throttle,
        "throttle-trigger-threshold" => {
            to.throttle_trigger_threshold = from.throttle_trigger_threshold
        }
        "vcpu-dirty-limit" => to.vcpu_dirty_limit_mbps = from.vcpu_dirty_limit_mbps,
        "x-vcpu-dirty-limit-period" => to.vcpu_dirty_limit_period = from.vcpu_dirty_limit_period,
        "x-ferry-timeout" => to.timeout = from.timeout,
        "x-ferry-timeout-per-gib" => to.timeout_per_gib = from.timeout_per_gib,
        "x-ferry-timeout-strategy" => to.timeout_strategy = from.timeout_strategy,
        "x-ferry-switchover-ceiling" => to.switchover_ceiling = from.switchover_ceiling,
        _ => {}
    }
}
