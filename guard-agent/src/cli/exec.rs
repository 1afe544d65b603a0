//! `guard-agent exec -- CMD…`: asks the running agent to move this process
//! into a fresh monitored cgroup, then runs CMD there (it inherits the
//! cgroup), passing stdio, signals and the exit status through.

use std::{ffi::OsString, os::unix::process::ExitStatusExt, process::Stdio};

use anyhow::{bail, Context};
use clap::Args;
use tokio::signal::unix::{signal, SignalKind};

use super::{cli_runtime, socket_error, StateDirArg};
use crate::{
    admin::{AdminClient, Request, Response},
    config::AgentConfig,
};

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Whether this process is in the terminal's foreground process group: then
/// keyboard signals (SIGINT, SIGQUIT) reach the child directly and must not
/// be forwarded a second time.
fn in_terminal_foreground() -> bool {
    // SAFETY: plain libc calls without pointers.
    unsafe {
        let fg = libc::tcgetpgrp(0);
        fg > 0 && fg == libc::getpgrp()
    }
}

pub fn run(args: ExecArgs) -> anyhow::Result<i32> {
    let sock = AgentConfig::admin_socket(&args.state.state_dir);
    cli_runtime()?.block_on(async {
        let mut c = AdminClient::request(&sock, &Request::Exec)
            .await
            .map_err(|e| socket_error(&sock, e))?;
        let bundle = match c.next().await? {
            Some(Response::ExecCgroup { cgroup, ca_bundle }) => {
                tracing::debug!("running in {}", cgroup.display());
                ca_bundle
            }
            Some(Response::Error { message }) => bail!("{message}"),
            other => bail!("unexpected response from the agent: {other:?}"),
        };

        // Handlers first: a signal that arrives once the child runs must be
        // forwarded, never take the default action on this process.
        let fg = in_terminal_foreground();
        let mut forwarded = Vec::new();
        for (kind, keyboard) in [
            (SignalKind::terminate(), false),
            (SignalKind::hangup(), false),
            (SignalKind::user_defined1(), false),
            (SignalKind::user_defined2(), false),
            (SignalKind::interrupt(), true),
            (SignalKind::quit(), true),
        ] {
            forwarded.push((signal(kind)?, kind.as_raw_value(), keyboard));
        }
        let mut cmd = tokio::process::Command::new(&args.command[0]);
        cmd.args(&args.command[1..]);
        // TLS clients in the child trust the Guard CA (and the system roots).
        if let Some(b) = &bundle {
            cmd.envs(crate::tls::trust_store::bundle_env(b));
        }
        let mut child = cmd
            .stdin(Stdio::inherit())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot run {}", args.command[0].to_string_lossy()))?;
        let pid = child.id().context("child pid")? as i32;

        let status = loop {
            let sigs = next_signal(&mut forwarded);
            tokio::select! {
                st = child.wait() => break st?,
                (signo, keyboard) = sigs => {
                    if !(keyboard && fg) {
                        // SAFETY: sending a signal to our own child.
                        unsafe { libc::kill(pid, signo) };
                    }
                }
            }
        };
        Ok(match (status.code(), status.signal()) {
            (Some(code), _) => code,
            (None, Some(sig)) => 128 + sig,
            _ => 1,
        })
    })
}

/// Waits for any of the forwarded signals; returns its number and whether
/// it is a keyboard signal.
async fn next_signal(sigs: &mut [(tokio::signal::unix::Signal, i32, bool)]) -> (i32, bool) {
    std::future::poll_fn(|cx| {
        for (s, no, kb) in sigs.iter_mut() {
            if s.poll_recv(cx).is_ready() {
                return std::task::Poll::Ready((*no, *kb));
            }
        }
        std::task::Poll::Pending
    })
    .await
}
