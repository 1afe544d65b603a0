//! Restart without a window: how a new agent takes over from a running one
//! of the same state directory.
//!
//! The running agent writes its pid to `<state dir>/agent.pid`. A new agent
//! started with `--takeover` sends it SIGUSR2, the handover stop:
//!
//! 1. the old agent closes its listeners: from now on monitored connects are
//!    still redirected (its pinned programs stay attached) and refused, never
//!    sent direct;
//! 2. it serves the connections it already accepted until they end (at most
//!    [`HANDOVER_DRAIN`]), records them, flushes the store and exits,
//!    leaving its attachments pinned;
//! 3. the new agent, which waited for it to exit, opens the store, attaches
//!    its own programs and then detaches the old ones.
//!
//! This module must never signal a process that is not a guard-agent of
//! this state directory.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

/// How long a handed-over agent serves its open connections before it
/// stops them.
pub const HANDOVER_DRAIN: Duration = Duration::from_secs(60);

/// How long a `--takeover` start waits for the old agent to exit.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(90);

/// A takeover that could not complete.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("cannot signal the running agent (pid {pid}) for a handover: {source}")]
    Signal {
        pid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("the running agent (pid {pid}) did not finish its handover within {}s; try again or stop it with SIGTERM", TAKEOVER_WAIT.as_secs())]
    Timeout { pid: i32 },
}

/// `<state dir>/agent.pid`.
pub fn pid_file(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.pid")
}

/// Records this process as the running agent of `state_dir`.
pub fn write_pid_file(state_dir: &Path) -> std::io::Result<()> {
    std::fs::write(pid_file(state_dir), format!("{}\n", std::process::id()))
}

/// Removes the pid file if it still names this process.
pub fn remove_pid_file(state_dir: &Path) {
    let path = pid_file(state_dir);
    if read_pid(&path) == Some(std::process::id() as i32) {
        let _ = std::fs::remove_file(path);
    }
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is a live guard-agent (its executable is named guard-agent).
fn is_agent(pid: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|n| n.starts_with("guard-agent"))
}

/// The pid of the live agent of `state_dir`, if one runs.
pub fn running_agent(state_dir: &Path) -> Option<i32> {
    read_pid(&pid_file(state_dir)).filter(|&pid| pid as u32 != std::process::id() && is_agent(pid))
}

/// Hands the running agent of `state_dir` over and waits until it has
/// exited. Returns its pid, or None when no agent was running.
pub async fn take_over(state_dir: &Path) -> Result<Option<i32>, TakeoverError> {
    let Some(pid) = read_pid(&pid_file(state_dir)) else {
        return Ok(None);
    };
    if pid as u32 == std::process::id() || !is_agent(pid) {
        return Ok(None);
    }
    tracing::info!(
        pid,
        "taking over: asking the running agent to hand over (SIGUSR2)"
    );
    nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGUSR2)
        .map_err(|source| TakeoverError::Signal { pid, source })?;
    let deadline = Instant::now() + TAKEOVER_WAIT;
    while is_agent(pid) {
        if Instant::now() > deadline {
            return Err(TakeoverError::Timeout { pid });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(pid, "the previous agent has exited; starting");
    Ok(Some(pid))
}
