//! `guard-agent run`: brings the agent up in a safe order, serves until
//! SIGTERM/SIGINT, and takes it down without losing events.
//!
//! Start-up order: preconditions (root, cgroup v2, scope cgroups exist) →
//! state dir → listeners → store → kernel programs loaded and attached →
//! admin socket. Every step fails with an error that says what to do.
//! Shutdown order: detach the kernel programs first (new connects go direct
//! at once), let open connections finish for a grace period, then stop
//! them, drain and flush the store.
//! Handover (SIGUSR2, see `handover`): close the listeners but leave the
//! programs attached (connects are refused until the next agent takes
//! over), serve open connections until they end, flush the store, exit.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc},
    time::{Duration, Instant},
};

use std::{io::Write, os::unix::fs::OpenOptionsExt, path::Path};

use globset::{Glob, GlobSetBuilder};
use tokio::{signal::unix::SignalKind, sync::watch};

use crate::{
    admin::{self, AdminState},
    approval::{Approvals, Notifier, NotifySettings},
    bpf::KernelPrograms,
    cgroup,
    config::AgentConfig,
    dlp::{DlpSettings, Engine, MaskKey},
    http::inspect::Inspector,
    intercept::{
        listener::{Counters, InspectSettings, Intercept},
        workers::{self, Workers},
    },
    policy::{load_dir, load_sources, PolicyError, PolicyStore},
    proc::ProcCache,
    secrets::{Secrets, SecretsError},
    store::{self, AdminRecord, Event, EventKind, EventSink, EventStore},
    tls::{
        ca::LocalCa,
        leaf::{LeafCache, DEFAULT_CACHE_SIZE},
        trust_store::{write_ca_bundle, SystemRoots},
        upstream::{RootSources, UpstreamTls},
    },
};

/// How long open connections may run on after SIGTERM.
const GRACE: Duration = Duration::from_secs(5);

/// Start-up failures, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("guard-agent run must run as root: it loads eBPF programs and attaches them to cgroups (try: sudo guard-agent run ...)")]
    NotRoot,
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("monitored cgroup {0} does not exist (create it, or fix --cgroup / `cgroups`)")]
    MissingCgroup(PathBuf),
    #[error("listen address {addr} is already in use (is another guard-agent running? choose another with --listen)")]
    PortTaken { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the intercept threads: {0}")]
    Threads(#[source] std::io::Error),
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} (is another guard-agent using this state directory?)")]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Bpf(#[from] crate::bpf::BpfError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("TLS interception: {0}")]
    Tls(String),
    #[error("policy: {0}")]
    Policy(#[from] PolicyError),
    #[error("detectors: {0}")]
    Dlp(#[from] crate::dlp::DlpError),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error(transparent)]
    Scope(#[from] crate::scope::ScopeError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Takeover(#[from] crate::handover::TakeoverError),
    #[error("excluded cgroup {path}: {message}")]
    ExcludedCgroup { path: PathBuf, message: String },
}

/// The policy used when no policy directory is configured.
pub(crate) const BUILT_IN_POLICY: &str = include_str!("../../policies/default.ron");

/// The host key for masking tokens and fingerprints: 32 random bytes in the
/// state directory, mode 0600, created on first start.
fn mask_key(state_dir: &Path) -> Result<MaskKey, StartError> {
    let path = state_dir.join("mask.key");
    let err = |source| StartError::StateDir {
        path: path.clone(),
        source,
    };
    let bytes = match std::fs::read(&path) {
        Ok(b) if b.len() == 32 => b,
        Ok(_) => {
            return Err(err(std::io::Error::other(
                "mask.key must hold exactly 32 bytes",
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: [u8; 32] = rand::random();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(err)?;
            f.write_all(&key).map_err(err)?;
            key.to_vec()
        }
        Err(e) => return Err(err(e)),
    };
    let mut key = [0u8; 32];
    key.copy_from_slice(&bytes);
    Ok(MaskKey::new(key))
}

/// The policy's detector settings as the DLP engine takes them.
pub(crate) fn dlp_settings(d: &crate::policy::schema::DetectorSettings) -> DlpSettings {
    use crate::dlp::MaskStyle as D;
    use crate::policy::MaskStyle as P;
    let mut s = DlpSettings {
        disabled: d.disabled.clone(),
        ..Default::default()
    };
    for (name, style) in &d.mask {
        let style = match style {
            P::Redact => D::Redact,
            P::Last4 => D::KeepLast4,
            P::Token => D::Token,
        };
        s.mask.insert(name.clone(), style);
    }
    for c in &d.custom {
        use crate::dlp::{DetectorClass as DC, ValidatorSettings as DV};
        use crate::policy::schema::{DetectorClass as PC, Validator as PV};
        let mask = s.mask.get(&c.name).copied().unwrap_or(D::Redact);
        s.custom.push(crate::dlp::CustomDetectorSettings {
            name: c.name.clone(),
            regex: c.regex.clone(),
            keywords: c.keywords.clone(),
            validator: c.validator.map(|v| match v {
                PV::Luhn => DV::Luhn,
                PV::Mod97 => DV::Mod97,
                PV::Entropy(n) => DV::Entropy(n),
            }),
            mask,
            class: match c.class {
                PC::Secret => DC::Secret,
                PC::Pii => DC::Pii,
                PC::Other => DC::Infrastructure,
            },
            home: c.home.clone(),
        });
    }
    for entry in &d.allowlist {
        let targets = if entry.detectors.is_empty() {
            vec!["*".to_owned()]
        } else {
            entry.detectors.clone()
        };
        for t in targets {
            s.allowlist_regex
                .entry(t)
                .or_default()
                .push(entry.regex.clone());
        }
    }
    s
}

/// Everything the inspecting paths need: CA, leaves, upstream trust,
/// policy, detectors.
fn inspection(
    cfg: &AgentConfig,
    state_dir: &Path,
) -> Result<(InspectSettings, Option<PathBuf>), StartError> {
    let ca = Arc::new(
        LocalCa::load_or_create(&state_dir.join("ca"))
            .map_err(|e| StartError::Tls(e.to_string()))?,
    );
    let leaves = Arc::new(LeafCache::new(Arc::clone(&ca), DEFAULT_CACHE_SIZE));
    let upstream_tls = UpstreamTls::from_sources(&RootSources {
        system: true,
        extra_pem_files: cfg.upstream_roots.clone(),
        exclude: vec![ca.cert_der().clone()],
    })
    .map_err(|e| StartError::Tls(e.to_string()))?;
    let policy = match &cfg.policy_dir {
        Some(dir) => PolicyStore::open(dir)?,
        None => PolicyStore::new(load_sources(&[(
            "policies/default.ron (built in)",
            BUILT_IN_POLICY,
        )])?),
    };
    let key = mask_key(state_dir)?;
    let engine = Engine::compile(&dlp_settings(policy.current().detectors()), key.clone())?;
    let mut globs = GlobSetBuilder::new();
    for g in &cfg.tls_passthrough {
        globs.add(Glob::new(g).map_err(|e| StartError::Tls(e.to_string()))?);
    }
    // A bundle of the system roots plus the Guard CA, for `exec` children.
    let public = state_dir.join("public");
    let bundle_path = public.join("ca-bundle.pem");
    let bundle = std::fs::create_dir_all(&public)
        .and_then(|_| std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o755)))
        .map_err(|e| e.to_string())
        .and_then(|_| {
            write_ca_bundle(&ca, &SystemRoots::Auto, &bundle_path).map_err(|e| e.to_string())
        });
    let bundle = match bundle {
        Ok(_) => Some(bundle_path),
        Err(e) => {
            tracing::warn!("no CA bundle for exec children: {e}");
            None
        }
    };
    Ok((
        InspectSettings {
            leaves,
            upstream_tls: Arc::new(upstream_tls),
            policy: Arc::new(policy),
            inspector: Inspector::new(engine, key),
            inspect_tls: cfg.inspect_tls,
            passthrough: globs.build().map_err(|e| StartError::Tls(e.to_string()))?,
        },
        bundle,
    ))
}

fn bind_group(addr: SocketAddr, n: usize) -> Result<Vec<std::net::TcpListener>, StartError> {
    workers::bind_group(addr, n).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            StartError::PortTaken { addr }
        } else {
            StartError::Listen { addr, source }
        }
    })
}

fn admin_gid(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// Reloads the policy directory and rebuilds the DLP engine from its
/// detector settings (custom detectors, allowlists, masks); a bad file or
/// detector setting keeps the last good policy and engine. `why` says what
/// triggered it (SIGHUP, a file change). The outcome is recorded as a
/// `policy_reload` event. The policy's UDP rules reach the kernel before the
/// new policy is served; if they cannot, the reload fails as a whole.
async fn reload_policy(
    cfg: &AgentConfig,
    inspect: &InspectSettings,
    udp_rules: &crate::bpf::udp::UdpRuleTable,
    stamp: &crate::policy::PolicyVersion,
    sink: &EventSink,
    why: &str,
) {
    let Some(dir) = &cfg.policy_dir else {
        tracing::info!("{why}: no policy directory configured; the built-in policy stays");
        return;
    };
    let compiled = load_dir(dir).map_err(|e| e.to_string()).and_then(|policy| {
        let key = inspect.inspector.key.clone();
        Engine::compile(&dlp_settings(policy.detectors()), key)
            .map(|engine| (policy, engine))
            .map_err(|e| e.to_string())
    });
    let compiled = compiled.and_then(|(policy, engine)| {
        udp_rules
            .apply(&cfg.udp, policy.udp_rules())
            .map(|_| (policy, engine))
            .map_err(|e| format!("its UDP rules could not be applied: {e}"))
    });
    let (action, detail) = match compiled {
        Ok((policy, engine)) => {
            inspect.inspector.replace_engine(engine);
            let v = inspect.policy.replace(policy);
            stamp.reloaded(v, dir);
            tracing::info!(version = v, "{why}: policy reloaded");
            (
                "policy_reload",
                format!("{why}: version {v} from {}", dir.display()),
            )
        }
        Err(e) => {
            tracing::error!("{why}: policy not reloaded, the last good one stays: {e}");
            (
                "policy_reload_failed",
                format!("{why}: the last good policy stays: {e}"),
            )
        }
    };
    record_reload(sink, action, detail, action == "policy_reload_failed").await;
}

/// Rereads the secrets file (SIGHUP): a file that fails its checks keeps
/// the secrets in force. Recorded as a `policy_reload` event that names the
/// secrets, never their values.
async fn reload_secrets(cfg: &AgentConfig, secrets: &arc_swap::ArcSwap<Secrets>, sink: &EventSink) {
    let Some(path) = &cfg.secrets_file else {
        return;
    };
    let (action, detail, failed) = match Secrets::load(path) {
        Ok(s) => {
            let names = s.names();
            tracing::info!(file = %path.display(), secrets = ?names, "SIGHUP: secrets reloaded");
            secrets.store(Arc::new(s));
            (
                "secrets_reload",
                format!("SIGHUP: secrets {names:?} from {}", path.display()),
                false,
            )
        }
        Err(e) => {
            tracing::error!("SIGHUP: secrets not reloaded, the ones in force stay: {e}");
            (
                "secrets_reload_failed",
                format!("SIGHUP: the secrets in force stay: {e}"),
                true,
            )
        }
    };
    record_reload(sink, action, detail, failed).await;
}

/// Records a reload's outcome as a `policy_reload` event; a failed one is
/// an error event whose `error` says what stays in force.
async fn record_reload(sink: &EventSink, action: &str, detail: String, failed: bool) {
    let mut ev = Event::admin(
        EventKind::PolicyReload,
        AdminRecord {
            action: action.into(),
            detail: Some(detail.clone()),
            ..Default::default()
        },
    );
    if failed {
        ev.verdict = store::Verdict::Error;
        ev.error = Some(detail);
    }
    sink.record(ev).await;
}

/// How often the policy directory is checked for changed files.
const POLICY_POLL: Duration = Duration::from_secs(2);

/// Name, size and modification time of every `*.ron` file in `dir`: when
/// this changes, the policy is reloaded (an unreadable directory counts as
/// a change too, so that the reload reports it).
fn policy_stamp(dir: &Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut stamp: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "ron"))
        .map(|p| {
            let m = std::fs::metadata(&p).ok();
            let len = m.as_ref().map_or(0, |m| m.len());
            let mtime = m.and_then(|m| m.modified().ok());
            (p, len, mtime)
        })
        .collect();
    stamp.sort();
    stamp
}

/// Runs the agent until a termination signal.
pub async fn run(mut cfg: AgentConfig) -> Result<(), StartError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(StartError::NotRoot);
    }
    // Before anything is opened: each connection holds up to six.
    crate::limits::raise_open_files_and_report();
    let mount = cgroup::cgroup2_mount()?;
    // Named scopes (units, user.slice, users, the host) become cgroups and uids.
    let scope = crate::scope::resolve(&mount, &cfg.scope, !cfg.cgroups.is_empty())?;
    cfg.cgroups.extend(scope.cgroups);
    cfg.cgroups = crate::scope::outermost(std::mem::take(&mut cfg.cgroups));
    cfg.uids.extend(scope.uids);
    for c in &cfg.cgroups {
        if !c.exists() {
            return Err(StartError::MissingCgroup(c.clone()));
        }
        cgroup::check_cgroup_dir(&mount, c)?;
    }
    let exec_parent = cfg
        .exec_cgroup
        .get_or_insert_with(|| mount.join("guard-exec"))
        .clone();
    if !exec_parent.starts_with(&mount) {
        return Err(cgroup::CgroupError::NotInHierarchy {
            path: exec_parent,
            mount,
        }
        .into());
    }
    cgroup::create(&exec_parent)?;
    for c in &cfg.exclude_cgroups {
        check_excluded_cgroup(&mount, c)?;
    }
    if cfg.takeover {
        crate::handover::take_over(&cfg.state_dir).await?;
    }

    // Everything the agent creates from here on is private unless chmod'ed.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let state_dir = cfg.state_dir.clone();
    let sd_err = |source| StartError::StateDir {
        path: state_dir.clone(),
        source,
    };
    std::fs::create_dir_all(&state_dir).map_err(sd_err)?;
    let gid = admin_gid(&cfg.admin_group);
    std::os::unix::fs::chown(&state_dir, Some(0), Some(gid.unwrap_or(0))).map_err(sd_err)?;
    // Group members may reach the admin socket; nobody else may look inside.
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o750)).map_err(sd_err)?;

    // One socket per intercept thread and listen address (see
    // `intercept::workers`).
    let intercept_threads = cfg
        .worker_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut groups = Vec::new();
    for addr in [cfg.listen_v4, cfg.listen_v6].into_iter().flatten() {
        groups.push(bind_group(addr, intercept_threads)?);
    }
    let metrics_listener = match cfg.metrics {
        Some(a) => Some(crate::metrics::bind(a).await?),
        None => None,
    };

    // The resolver's sockets exist before DNS is redirected to them.
    let dns_addrs = crate::dns::listen_addrs(&cfg);
    let dns_socks = crate::dns::bind(&dns_addrs)
        .await
        .map_err(|(addr, source)| {
            if source.kind() == std::io::ErrorKind::AddrInUse {
                StartError::PortTaken { addr }
            } else {
                StartError::Listen { addr, source }
            }
        })?;

    let (inspect, ca_bundle) = inspection(&cfg, &state_dir)?;
    let inspect = Arc::new(inspect);
    let store = EventStore::open(&AgentConfig::store_dir(&state_dir))?;
    let writer = store::start_writer(store.clone(), cfg.retention);
    crate::handover::write_pid_file(&state_dir).map_err(sd_err)?;

    let secrets = match &cfg.secrets_file {
        Some(p) => {
            let s = Secrets::load(p)?;
            tracing::info!(file = %p.display(), secrets = ?s.names(), "secrets for credential injection loaded");
            s
        }
        None => Secrets::none(),
    };
    let secrets = Arc::new(arc_swap::ArcSwap::from_pointee(secrets));
    let approvals = Arc::new(Approvals::new(
        writer.sink.clone(),
        Notifier::new(
            NotifySettings {
                command: cfg.notify_command.clone(),
                webhook: cfg.notify_webhook.clone(),
                state_dir: state_dir.clone(),
                mark: cfg.mark,
            },
            Some(Arc::clone(&inspect.upstream_tls)),
        ),
    ));

    let (mut programs, table) = KernelPrograms::load(&cfg)?;
    let dns_peers = programs.dns_peers()?;
    // The policy's UDP rules are in the kernel before anything is attached.
    let udp_rules = programs.udp_rules(&cfg.udp)?;
    udp_rules.apply(&cfg.udp, inspect.policy.current().udp_rules())?;
    // The exec parent inherits the programs when it lies below a monitored
    // cgroup; attaching it again would run every program twice.
    let exec_inherits = cfg.cgroups.iter().any(|c| exec_parent.starts_with(c));
    let own_exec = (!exec_inherits).then_some(&exec_parent);
    for c in cfg.cgroups.iter().chain(own_exec) {
        if let Err(e) = programs.attach(c) {
            programs.release();
            return Err(e.into());
        }
        tracing::info!(cgroup = %c.display(), "kernel programs attached");
    }
    // Ours are attached: only now let go of what an earlier run left.
    programs.take_over_stale();
    tracing::info!(pins = %programs.pin_dir().display(), mode = %programs.heartbeat().fail_mode(), "attachments pinned");

    let counters = Arc::new(Counters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let procs = Arc::new(ProcCache::default());
    let names = Arc::new(crate::dns::NameMap::default());
    let resolver_health = Arc::new(crate::dns::ResolverHealth::default());
    let resolver = (!dns_socks.is_empty()).then(|| {
        let upstreams = crate::dns::upstreams(&cfg.dns, &dns_addrs);
        if upstreams.is_empty() {
            tracing::warn!("no upstream resolver (none configured, none in /etc/resolv.conf): DNS queries will fail with SERVFAIL");
        }
        *resolver_health.upstream.lock().unwrap_or_else(|p| p.into_inner()) =
            upstreams.iter().map(|u| u.to_string()).collect();
        *resolver_health.listen.lock().unwrap_or_else(|p| p.into_inner()) =
            dns_addrs.iter().map(|u| u.to_string()).collect();
        Arc::new(crate::dns::Resolver {
            settings: cfg.dns.clone(),
            upstreams,
            mark: cfg.mark,
            names: Arc::clone(&names),
            peers: dns_peers,
            procs: Arc::clone(&procs),
            sink: writer.sink.clone(),
            policy: Arc::clone(&inspect.policy),
            inspector: Arc::clone(&inspect.inspector),
            health: Arc::clone(&resolver_health),
            rates: Default::default(),
        })
    });
    let mut metrics_tasks = Vec::new();
    if let Some(l) = metrics_listener {
        let addr = l.local_addr().ok();
        let m = Arc::new(crate::metrics::Metrics::new(Arc::clone(&counters)));
        let held = Arc::clone(&approvals);
        m.count_pending_holds_with(move || held.pending().len());
        let lossy = store.clone();
        m.count_lost_events_with(move || lossy.lost().count);
        metrics_tasks.push(tokio::spawn(crate::metrics::observe_events(
            Arc::clone(&m),
            writer.stored.subscribe(),
            store.clone(),
            stop_rx.clone(),
        )));
        metrics_tasks.push(tokio::spawn(crate::metrics::serve(l, m, stop_rx.clone())));
        tracing::info!(addr = ?addr, "serving Prometheus metrics at /metrics");
    }
    let policy_version = Arc::new(crate::policy::PolicyVersion::new(
        cfg.policy_dir.as_deref(),
        BUILT_IN_POLICY,
    ));
    let intercept = Arc::new(Intercept {
        table,
        dns: resolver.clone(),
        names,
        procs,
        sink: writer.sink.clone(),
        counters: Arc::clone(&counters),
        mark: cfg.mark,
        inspect: Arc::clone(&inspect),
        approvals: Arc::clone(&approvals),
        secrets: Arc::clone(&secrets),
    });
    for g in &groups {
        tracing::info!(
            addr = %g[0].local_addr().map(|a| a.to_string()).unwrap_or_default(),
            threads = intercept_threads,
            "listening for redirected connections"
        );
    }
    // Thread i gets socket i of every address.
    let mut per_thread: Vec<Vec<std::net::TcpListener>> =
        (0..intercept_threads).map(|_| Vec::new()).collect();
    for g in groups {
        for (i, l) in g.into_iter().enumerate() {
            per_thread[i].push(l);
        }
    }
    let workers = match Workers::start(per_thread, Arc::clone(&intercept), stop_rx.clone()) {
        Ok(w) => w,
        Err(e) => {
            programs.release();
            return Err(StartError::Threads(e));
        }
    };
    let mut tasks = Vec::new();

    if let Some(r) = &resolver {
        for s in dns_socks {
            tracing::info!(addr = %s.local_addr().map(|a| a.to_string()).unwrap_or_default(), "resolving redirected DNS");
            tasks.push(tokio::spawn(Arc::clone(r).serve_udp(s, stop_rx.clone())));
        }
        resolver_health
            .up
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    drop(resolver);

    let sock = AgentConfig::admin_socket(&state_dir);
    let admin_listener = match admin::bind(&sock, gid) {
        Ok(l) => l,
        Err(e) => {
            // A failed start is a clean exit: detach, do not black-hole.
            programs.release();
            return Err(e.into());
        }
    };
    let admin_state = Arc::new(AdminState {
        config: cfg.clone(),
        attached: programs.attached().to_vec(),
        counters: Arc::clone(&counters),
        store: store.clone(),
        stored: writer.stored.clone(),
        started: Instant::now(),
        admin_gid: gid,
        exec_seq: AtomicU64::new(0),
        ca_bundle,
        resolver: (!dns_addrs.is_empty()).then_some(resolver_health),
        approver_gid: admin_gid(&cfg.approver_group),
        approvals: Arc::clone(&approvals),
        policy_version: Arc::clone(&policy_version),
        attachments: Some(Arc::new(programs.view())),
    });
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state, stop_rx.clone()));
    let reaper_parent = exec_parent.clone();
    let mut reaper_stop = stop_rx.clone();
    let reaper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = tick.tick() => admin::reap_exec_cgroups(&reaper_parent),
                _ = reaper_stop.changed() => break,
            }
        }
    });
    let heartbeat = programs.heartbeat();
    let mut heartbeat_stop = stop_rx.clone();
    let heartbeat_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::bpf::liveness::HEARTBEAT_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => if let Err(e) = heartbeat.beat() {
                    tracing::warn!("cannot write the heartbeat: {e}");
                },
                _ = heartbeat_stop.changed() => break,
            }
        }
    });
    // Start-up's freed buffers stay mapped under the body-buffer trim
    // threshold (see `allocator`): give them back once, now, and what a
    // busy period freed once it is over.
    crate::allocator::return_free_memory();
    let trim_store = store.clone();
    let trim_task = tokio::spawn(crate::allocator::trim_when_quiet(
        move || trim_store.written(),
        stop_rx.clone(),
    ));
    tracing::info!(pid = std::process::id(), state_dir = %state_dir.display(), "guard-agent is running");

    let mut term = tokio::signal::unix::signal(SignalKind::terminate()).expect("signal handler");
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).expect("signal handler");
    let mut hup = tokio::signal::unix::signal(SignalKind::hangup()).expect("signal handler");
    let mut usr2 =
        tokio::signal::unix::signal(SignalKind::user_defined2()).expect("signal handler");
    let mut handover = false;
    let mut poll = tokio::time::interval(POLICY_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stamp = cfg.policy_dir.as_deref().map(policy_stamp);
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = usr2.recv() => {
                tracing::info!("SIGUSR2: handing over; new connects are refused until the next agent takes over");
                handover = true;
                break;
            }
            _ = hup.recv() => {
                stamp = cfg.policy_dir.as_deref().map(policy_stamp);
                reload_policy(&cfg, &inspect, &udp_rules, &policy_version, &writer.sink, "SIGHUP").await;
                reload_secrets(&cfg, &secrets, &writer.sink).await;
            }
            _ = poll.tick(), if stamp.is_some() => {
                let now = cfg.policy_dir.as_deref().map(policy_stamp);
                if now != stamp {
                    stamp = now;
                    reload_policy(&cfg, &inspect, &udp_rules, &policy_version, &writer.sink, "policy files changed").await;
                }
            }
        }
    }

    let grace = if handover {
        // 1. Stop accepting; the pinned programs stay for the next agent.
        workers.close_listeners();
        for t in &tasks {
            t.abort();
        }
        drop(programs);
        tracing::info!("listeners closed, kernel programs left attached for the next agent");
        crate::handover::HANDOVER_DRAIN
    } else {
        // 1. New connects go direct from now on.
        programs.release();
        tracing::info!("kernel programs detached");
        GRACE
    };
    // 2. Connections already redirected may finish.
    let deadline = Instant::now() + grace;
    while counters.active.load(std::sync::atomic::Ordering::Relaxed) > 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 3. Stop everything, then drain the store.
    let _ = stop_tx.send(true);
    workers.join().await;
    for t in tasks {
        let _ = t.await;
    }
    let _ = admin_task.await;
    let _ = reaper.await;
    for t in metrics_tasks {
        let _ = t.await;
    }
    let _ = heartbeat_task.await;
    let _ = trim_task.await;
    // Connection tasks hold sink clones; give stopped ones a moment to record.
    let drain_deadline = Instant::now() + Duration::from_secs(2);
    while Arc::strong_count(&intercept) > 1 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(intercept);
    // Approvals hold a sink clone too (held requests, admin connections).
    while Arc::strong_count(&approvals) > 1 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(approvals);
    drop(writer.sink);
    let _ = writer.task.await;
    let _ = std::fs::remove_file(&sock);
    crate::handover::remove_pid_file(&state_dir);
    admin::reap_exec_cgroups(&exec_parent);
    tracing::info!(events = store.len(), "event store flushed; bye");
    Ok(())
}

/// An excluded cgroup must exist in the hierarchy and sit no deeper than the
/// kernel programs look (`MAX_EXCLUDED_CGROUP_LEVEL`).
fn check_excluded_cgroup(mount: &Path, path: &Path) -> Result<(), StartError> {
    let err = |message: String| StartError::ExcludedCgroup {
        path: path.to_owned(),
        message,
    };
    if !path.is_dir() {
        return Err(err(
            "does not exist (create it first, or fix --exclude-cgroup / `exclude_cgroups`)".into(),
        ));
    }
    cgroup::check_cgroup_dir(mount, path)?;
    let level = path
        .strip_prefix(mount)
        .map(|rel| rel.components().count())
        .unwrap_or(usize::MAX);
    if level > guard_common::MAX_EXCLUDED_CGROUP_LEVEL as usize {
        return Err(err(format!(
            "is {level} levels deep; exclusions work down to level {}",
            guard_common::MAX_EXCLUDED_CGROUP_LEVEL
        )));
    }
    Ok(())
}
