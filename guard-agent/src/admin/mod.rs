//! The admin API: a Unix socket in the state directory through which the CLI
//! reads status and events and asks for `exec` cgroups.
//!
//! Authorization: the socket is mode 0660, owned by root and the admin group
//! (`guard`), and every connection's peer credentials (SO_PEERCRED) are
//! checked again: only root or a member of the admin or approver group is
//! served, and each request again: reading events and listing, approving,
//! denying or revoking holds and grants needs root or the approver group
//! (`approver_group`, default the admin group); `status` and `exec` need the
//! admin group. A monitored, unprivileged process therefore cannot read
//! events, approve its own request or change anything. `exec` moves only
//! the calling process itself, never another. Who decided a hold is taken
//! from the peer credentials, never from the request.

pub mod protocol;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{broadcast, watch},
};

pub use protocol::{Request, Response, Status};

use crate::{
    approval::{Approvals, Approver},
    bpf::PROGRAMS,
    cgroup,
    config::AgentConfig,
    intercept::listener::Counters,
    store::{Event, EventStore},
};

/// What the admin server reads from the running agent.
pub struct AdminState {
    pub config: AgentConfig,
    pub attached: Vec<PathBuf>,
    pub counters: Arc<Counters>,
    pub store: EventStore,
    pub stored: broadcast::Sender<Arc<Event>>,
    pub started: Instant,
    /// Group id allowed besides root (None: root only).
    pub admin_gid: Option<u32>,
    pub exec_seq: AtomicU64,
    /// System roots plus the Guard CA, for `exec` children.
    pub ca_bundle: Option<PathBuf>,
    /// The DNS resolver's health; `None` when DNS is turned off.
    pub resolver: Option<Arc<crate::dns::ResolverHealth>>,
    /// Group id allowed to decide holds and read events besides root.
    pub approver_gid: Option<u32>,
    pub approvals: Arc<Approvals>,
    /// Version, digest and load time of the policy in force.
    pub policy_version: Arc<crate::policy::PolicyVersion>,
    /// Pinned attachments, fail mode and heartbeat, for `status`.
    pub attachments: Option<Arc<crate::bpf::AttachmentView>>,
}

/// Errors setting up the admin socket.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the admin socket: removes a stale one, sets 0660 root:admin-group.
pub fn bind(path: &Path, admin_gid: Option<u32>) -> Result<UnixListener, AdminError> {
    let err = |source| AdminError::Socket {
        path: path.to_owned(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::os::unix::fs::chown(path, Some(0), Some(admin_gid.unwrap_or(0))).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

/// Supplementary and primary groups of a process, from /proc.
fn groups_of(pid: i32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in status.lines() {
        if let Some(g) = line.strip_prefix("Groups:") {
            out.extend(g.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
        }
        if let Some(g) = line.strip_prefix("Gid:") {
            out.extend(g.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
        }
    }
    out
}

/// Whether a peer may use the admin API.
pub fn authorized(uid: u32, gid: u32, pid: Option<i32>, admin_gid: Option<u32>) -> bool {
    if uid == 0 {
        return true;
    }
    let Some(admin) = admin_gid else { return false };
    gid == admin || pid.is_some_and(|p| groups_of(p).contains(&admin))
}

/// Serves the admin socket until `shutdown` turns true.
pub async fn serve(
    listener: UnixListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            res = listener.accept() => match res {
                Ok((stream, _)) => {
                    let state = Arc::clone(&state);
                    let stop = shutdown.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, state, stop).await {
                            tracing::debug!("admin connection: {e}");
                        }
                    });
                }
                Err(e) => tracing::warn!("admin accept failed: {e}"),
            },
            _ = shutdown.changed() => break,
        }
    }
}

async fn send(w: &mut (impl AsyncWriteExt + Unpin), r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r)?;
    line.push(b'\n');
    w.write_all(&line).await
}

async fn handle(
    stream: UnixStream,
    state: Arc<AdminState>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let (r, mut w) = stream.into_split();
    let approver = authorized(cred.uid(), cred.gid(), cred.pid(), state.approver_gid);
    if !approver && !authorized(cred.uid(), cred.gid(), cred.pid(), state.admin_gid) {
        tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "admin request refused: not root or in the admin group");
        return send(
            &mut w,
            &Response::Error {
                message: format!(
                    "permission denied: uid {} is neither root nor in the `{}` group",
                    cred.uid(),
                    state.config.admin_group
                ),
            },
        )
        .await;
    }
    let mut lines = BufReader::new(r).lines();
    let Some(line) = lines.next_line().await? else {
        return Ok(());
    };
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            return send(
                &mut w,
                &Response::Error {
                    message: format!("bad request: {e}"),
                },
            )
            .await;
        }
    };
    if req.needs_approver() && !approver {
        tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "admin request refused: not root or in the approver group");
        return send(
            &mut w,
            &Response::Error {
                message: format!(
                    "permission denied: uid {} is neither root nor in the `{}` group, which may read events and decide holds",
                    cred.uid(),
                    state.config.approver_group
                ),
            },
        )
        .await;
    }
    match req {
        Request::Approvals { follow } => {
            let mut live = state.approvals.subscribe();
            let mut seen = std::collections::HashSet::new();
            for h in state.approvals.pending() {
                seen.insert(h.id);
                send(&mut w, &Response::Hold(Box::new(h))).await?;
            }
            if !follow {
                return send(&mut w, &Response::End).await;
            }
            loop {
                tokio::select! {
                    msg = live.recv() => match msg {
                        Ok(h) if seen.insert(h.id) => send(&mut w, &Response::Hold(Box::new(h))).await?,
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    },
                    _ = crate::shutdown::stopped(&mut stop) => return Ok(()),
                }
            }
        }
        Request::Grants => {
            for g in state.approvals.grants() {
                send(&mut w, &Response::Grant(Box::new(g))).await?;
            }
            send(&mut w, &Response::End).await
        }
        Request::Decide { id, decision } => {
            let by = Approver::from_uid(cred.uid());
            let resp = match state.approvals.decide(id, &decision, &by) {
                Ok(grant) => Response::Decided {
                    id,
                    approved: decision.approve,
                    grant: grant.map(Box::new),
                },
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            };
            send(&mut w, &resp).await
        }
        Request::Revoke { grant_id, note } => {
            let by = Approver::from_uid(cred.uid());
            let resp = match state.approvals.revoke(grant_id, &by, note) {
                Ok(g) => Response::Revoked(Box::new(g)),
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            };
            send(&mut w, &resp).await
        }
        Request::Status => send(&mut w, &Response::Status(Box::new(status(&state)))).await,
        Request::Events { filter, follow } => {
            // Subscribe before reading history so nothing falls in between.
            let mut live = state.stored.subscribe();
            let store = state.store.clone();
            let f = filter.clone();
            let history = tokio::task::spawn_blocking(move || store.query(&f))
                .await
                .map_err(std::io::Error::other)?;
            let history = match history {
                Ok(h) => h,
                Err(e) => {
                    return send(
                        &mut w,
                        &Response::Error {
                            message: e.to_string(),
                        },
                    )
                    .await
                }
            };
            let mut last = 0;
            for e in history {
                last = e.id;
                send(&mut w, &Response::Event(Box::new(e))).await?;
            }
            if !follow {
                return send(&mut w, &Response::End).await;
            }
            let live_filter = crate::store::EventFilter {
                limit: None,
                ..filter
            };
            loop {
                tokio::select! {
                    msg = live.recv() => match msg {
                        Ok(e) if e.id > last && live_filter.matches(&e) => {
                            last = e.id;
                            send(&mut w, &Response::Event(Box::new((*e).clone()))).await?;
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            let store = state.store.clone();
                            let missed = tokio::task::spawn_blocking(move || store.after(last)).await.map_err(std::io::Error::other)?;
                            for e in missed.unwrap_or_default() {
                                if live_filter.matches(&e) {
                                    last = e.id;
                                    send(&mut w, &Response::Event(Box::new(e))).await?;
                                }
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    },
                    _ = crate::shutdown::stopped(&mut stop) => return Ok(()),
                }
            }
        }
        Request::Exec => {
            let resp = match exec_cgroup(&state, cred.pid()) {
                Ok(cgroup) => Response::ExecCgroup {
                    cgroup,
                    ca_bundle: state.ca_bundle.clone(),
                },
                Err(message) => Response::Error { message },
            };
            send(&mut w, &resp).await
        }
    }
}

fn exec_cgroup(state: &AdminState, pid: Option<i32>) -> Result<PathBuf, String> {
    let parent = state
        .config
        .exec_cgroup
        .as_ref()
        .ok_or("this agent has no exec cgroup configured")?;
    let pid = pid
        .filter(|p| *p > 0)
        .ok_or("the caller's pid is unknown")? as u32;
    let n = state.exec_seq.fetch_add(1, Ordering::Relaxed);
    let dir = parent.join(format!("exec-{pid}-{n}"));
    cgroup::create(&dir).map_err(|e| e.to_string())?;
    cgroup::move_process(&dir, pid).map_err(|e| {
        let _ = cgroup::remove(&dir);
        e.to_string()
    })?;
    tracing::info!(pid, cgroup = %dir.display(), "exec: process moved into a monitored cgroup");
    Ok(dir)
}

/// Removes `exec` cgroups nobody is left in.
pub fn reap_exec_cgroups(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let is_exec = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("exec-"));
        if is_exec && p.is_dir() && !cgroup::is_populated(&p) {
            let _ = cgroup::remove(&p);
        }
    }
}

fn status(state: &AdminState) -> Status {
    let c = &state.config;
    let mut listen = Vec::new();
    listen.extend(c.listen_v4.map(|a| a.to_string()));
    listen.extend(c.listen_v6.map(|a| a.to_string()));
    let memory = crate::allocator::resident();
    let fds = crate::limits::descriptors();
    let lost = state.store.lost();
    Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        uptime_secs: state.started.elapsed().as_secs(),
        listen,
        programs: PROGRAMS.iter().map(|s| s.to_string()).collect(),
        cgroups: state.attached.clone(),
        exec_cgroup: c.exec_cgroup.clone(),
        uids: c.uids.clone(),
        intercept: c.intercept.iter().map(|n| n.to_string()).collect(),
        exclude: c.exclude.iter().map(|n| n.to_string()).collect(),
        counters: state.counters.snapshot(),
        store_events: state.store.len() as u64,
        store_bytes: state.store.bytes(),
        store_size_on_disk: state.store.size_on_disk(),
        store_disk_available: crate::store::disk_available(&c.state_dir),
        store_events_lost: lost.count,
        store_last_error_at: lost.last.as_ref().map(|(at, _)| *at),
        store_last_error: lost.last.map(|(_, e)| e),
        state_dir: c.state_dir.clone(),
        memory_kib: memory.map(|m| m.now_kib),
        memory_peak_kib: memory.map(|m| m.peak_kib),
        fds_open: fds.map(|d| d.open),
        fds_limit: fds.map(|d| d.limit),
        resolver: state.resolver.as_ref().map(|r| r.snapshot()),
        policy: Some(state.policy_version.current()),
        retention_max_age_secs: c.retention.max_age.as_secs(),
        retention_max_bytes: c.retention.max_bytes,
        metrics: c.metrics.map(|a| a.to_string()),
        fail_mode: state
            .attachments
            .as_ref()
            .map(|a| a.heartbeat.fail_mode())
            .unwrap_or_default(),
        heartbeat_age_ms: state
            .attachments
            .as_ref()
            .and_then(|a| a.heartbeat.age())
            .map(|d| d.as_millis() as u64),
        pin_dir: state.attachments.as_ref().map(|a| a.pin_dir.clone()),
        scopes: state
            .attachments
            .as_ref()
            .map(|a| {
                a.scopes()
                    .into_iter()
                    .map(|s| protocol::ScopeStatus {
                        cgroup: s.cgroup,
                        links: s.links,
                        pinned: s.pinned,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        excluded_cgroups: c.exclude_cgroups.clone(),
    }
}

/// Client side: sends one request and returns the response stream.
pub struct AdminClient {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    _w: tokio::net::unix::OwnedWriteHalf,
}

impl AdminClient {
    /// Connects and sends `req`.
    pub async fn request(socket: &Path, req: &Request) -> std::io::Result<Self> {
        let stream = UnixStream::connect(socket).await?;
        let (r, mut w) = stream.into_split();
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        w.write_all(&line).await?;
        Ok(Self {
            lines: BufReader::new(r).lines(),
            _w: w,
        })
    }

    /// The next response, or None when the agent closed the stream.
    pub async fn next(&mut self) -> std::io::Result<Option<Response>> {
        match self.lines.next_line().await? {
            Some(l) => Ok(Some(serde_json::from_str(&l)?)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_or_the_admin_group() {
        assert!(authorized(0, 0, None, None));
        assert!(!authorized(1000, 1000, None, None));
        assert!(authorized(1000, 977, None, Some(977)));
        assert!(!authorized(1000, 1000, None, Some(977)));
    }

    #[test]
    fn events_and_decisions_need_an_approver_status_and_exec_do_not() {
        use crate::approval::{DecisionRequest, Scope};
        assert!(!Request::Status.needs_approver());
        assert!(!Request::Exec.needs_approver());
        assert!(Request::Events {
            filter: Default::default(),
            follow: false
        }
        .needs_approver());
        assert!(Request::Approvals { follow: true }.needs_approver());
        assert!(Request::Grants.needs_approver());
        assert!(Request::Decide {
            id: 1,
            decision: DecisionRequest {
                approve: true,
                scope: Scope::Request,
                duration_secs: None,
                note: None,
            },
        }
        .needs_approver());
        assert!(Request::Revoke {
            grant_id: 1,
            note: None
        }
        .needs_approver());
    }
}
