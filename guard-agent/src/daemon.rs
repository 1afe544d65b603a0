//! `guard-agent run`: brings the agent up in a safe order, serves until
//! SIGTERM/SIGINT, and takes it down without losing events.
//!
//! Start-up order: preconditions (root, cgroup v2, scope cgroups exist) →
//! state dir → listeners → store → kernel programs loaded and attached →
//! admin socket. Every step fails with an error that says what to do.
//! Shutdown order: detach the kernel programs first (new connects go direct
//! at once), let open connections finish for a grace period, then stop
//! them, drain and flush the store.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc},
    time::{Duration, Instant},
};

use std::{io::Write, os::unix::fs::OpenOptionsExt, path::Path};

use globset::{Glob, GlobSetBuilder};
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch};

use crate::{
    admin::{self, AdminState},
    bpf::KernelPrograms,
    cgroup,
    config::AgentConfig,
    dlp::{DlpSettings, Engine, MaskKey},
    http::inspect::Inspector,
    intercept::listener::{self, Counters, InspectSettings, Intercept},
    policy::{load_dir, load_sources, PolicyError, PolicyStore},
    proc::ProcCache,
    store::{self, EventStore},
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

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| {
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
/// triggered it (SIGHUP, a file change).
fn reload_policy(cfg: &AgentConfig, inspect: &InspectSettings, why: &str) {
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
    match compiled {
        Ok((policy, engine)) => {
            inspect.inspector.replace_engine(engine);
            let v = inspect.policy.replace(policy);
            tracing::info!(version = v, "{why}: policy reloaded");
        }
        Err(e) => tracing::error!("{why}: policy not reloaded, the last good one stays: {e}"),
    }
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
    let mount = cgroup::cgroup2_mount()?;
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

    let v4 = match cfg.listen_v4 {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let v6 = match cfg.listen_v6 {
        Some(a) => Some(bind(a).await?),
        None => None,
    };

    let (inspect, ca_bundle) = inspection(&cfg, &state_dir)?;
    let inspect = Arc::new(inspect);
    let store = EventStore::open(&AgentConfig::store_dir(&state_dir))?;
    let writer = store::start_writer(store.clone(), cfg.retention);

    let (mut programs, table) = KernelPrograms::load(&cfg)?;
    // The exec parent inherits the programs when it lies below a monitored
    // cgroup; attaching it again would run every program twice.
    let exec_inherits = cfg.cgroups.iter().any(|c| exec_parent.starts_with(c));
    let own_exec = (!exec_inherits).then_some(&exec_parent);
    for c in cfg.cgroups.iter().chain(own_exec) {
        programs.attach(c)?;
        tracing::info!(cgroup = %c.display(), "kernel programs attached");
    }

    let counters = Arc::new(Counters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let intercept = Arc::new(Intercept {
        table,
        procs: Arc::new(ProcCache::default()),
        sink: writer.sink.clone(),
        counters: Arc::clone(&counters),
        mark: cfg.mark,
        inspect: Arc::clone(&inspect),
    });
    let mut tasks = Vec::new();
    for l in [v4, v6].into_iter().flatten() {
        tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening for redirected connections");
        tasks.push(tokio::spawn(listener::serve(
            l,
            Arc::clone(&intercept),
            stop_rx.clone(),
        )));
    }

    let sock = AgentConfig::admin_socket(&state_dir);
    let admin_listener = admin::bind(&sock, gid)?;
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
    tracing::info!(pid = std::process::id(), state_dir = %state_dir.display(), "guard-agent is running");

    let mut term = tokio::signal::unix::signal(SignalKind::terminate()).expect("signal handler");
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).expect("signal handler");
    let mut hup = tokio::signal::unix::signal(SignalKind::hangup()).expect("signal handler");
    let mut poll = tokio::time::interval(POLICY_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stamp = cfg.policy_dir.as_deref().map(policy_stamp);
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = hup.recv() => {
                stamp = cfg.policy_dir.as_deref().map(policy_stamp);
                reload_policy(&cfg, &inspect, "SIGHUP");
            }
            _ = poll.tick(), if stamp.is_some() => {
                let now = cfg.policy_dir.as_deref().map(policy_stamp);
                if now != stamp {
                    stamp = now;
                    reload_policy(&cfg, &inspect, "policy files changed");
                }
            }
        }
    }

    // 1. New connects go direct from now on.
    drop(programs);
    tracing::info!("kernel programs detached");
    // 2. Connections already redirected may finish.
    let deadline = Instant::now() + GRACE;
    while counters.active.load(std::sync::atomic::Ordering::Relaxed) > 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 3. Stop everything, then drain the store.
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let _ = admin_task.await;
    let _ = reaper.await;
    // Connection tasks hold sink clones; give stopped ones a moment to record.
    let drain_deadline = Instant::now() + Duration::from_secs(2);
    while Arc::strong_count(&intercept) > 1 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(intercept);
    drop(writer.sink);
    let _ = writer.task.await;
    let _ = std::fs::remove_file(&sock);
    admin::reap_exec_cgroups(&exec_parent);
    tracing::info!(events = store.len(), "event store flushed; bye");
    Ok(())
}
