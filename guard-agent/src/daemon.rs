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

use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch};

use crate::{
    admin::{self, AdminState},
    bpf::KernelPrograms,
    cgroup,
    config::AgentConfig,
    intercept::listener::{self, Counters, Intercept},
    proc::ProcCache,
    store::{self, EventStore},
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
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
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
