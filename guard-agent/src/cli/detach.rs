//! `guard-agent detach`: takes Guard's kernel programs off the monitored
//! cgroups when no agent runs.
//!
//! A killed agent, or one stopped with SIGUSR2 (the handover stop, which
//! `systemctl stop` and `restart` send), leaves its programs attached and
//! pinned on purpose: monitored connections are refused rather than sent
//! out uninspected (fail closed). This command is the operator's way to
//! turn that off. It must never act while an agent of the same state
//! directory runs (that agent owns its attachments; SIGTERM detaches them).

use anyhow::{bail, Context};
use clap::Args;

use super::StateDirArg;

#[derive(Debug, Args)]
pub struct DetachArgs {
    #[command(flatten)]
    pub state: StateDirArg,
}

pub fn run(args: DetachArgs) -> anyhow::Result<()> {
    let state_dir = &args.state.state_dir;
    if !nix::unistd::geteuid().is_root() {
        bail!("detaching kernel programs needs root");
    }
    if let Some(pid) = crate::handover::running_agent(state_dir) {
        bail!(
            "an agent of {} is running (pid {pid}); stop it with SIGTERM, which detaches its programs",
            state_dir.display()
        );
    }
    let dir = crate::bpf::pins::instance_dir(state_dir);
    let n = crate::bpf::pins::release_instance(state_dir)
        .with_context(|| format!("removing the pins in {}", dir.display()))?;
    if n == 0 {
        println!(
            "nothing attached for {} ({} has no pins)",
            state_dir.display(),
            dir.display()
        );
    } else {
        println!(
            "detached {n} links left by a stopped agent of {}: monitored processes connect directly now",
            state_dir.display()
        );
    }
    Ok(())
}
