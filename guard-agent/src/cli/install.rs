//! `guard-agent install | uninstall`: the command-line edge of
//! [`crate::install`].

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::install::{self, InstallOptions, Target};

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// Configuration file to install as /etc/guard/agent.ron (validated
    /// first; default: monitor interactive users with the default policy).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print what would be done and the unit; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Install below this directory (like DESTDIR): files only, no group,
    /// trust store or systemctl.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Only print the systemd unit (for packaging) and exit.
    #[arg(long)]
    pub print_unit: bool,
    /// With --print-unit: the binary path the unit runs (default: where
    /// install would put this binary).
    #[arg(long, value_name = "PATH", requires = "print_unit")]
    pub binary: Option<PathBuf>,
    /// Only print the default configuration (for packaging) and exit.
    #[arg(long, conflicts_with = "print_unit")]
    pub print_config: bool,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// Also remove the state directory (event store, CA) and changed
    /// configuration and policy files.
    #[arg(long)]
    pub purge: bool,
    /// Print what would be done; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Uninstall from below this directory (see `install --root`).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
}

fn need_root_user(t: &Target) -> anyhow::Result<()> {
    if t.is_host() && !t.dry_run && t.systemd && !nix::unistd::geteuid().is_root() {
        anyhow::bail!("installing a system service needs root (try: sudo guard-agent install)");
    }
    Ok(())
}

pub fn run_install(args: InstallArgs) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("finding this binary")?;
    if args.print_unit {
        let bin = args
            .binary
            .unwrap_or_else(|| install::installed_binary_path(&exe));
        print!("{}", install::unit_for(&bin));
        return Ok(0);
    }
    if args.print_config {
        print!("{}", install::DEFAULT_CONFIG);
        return Ok(0);
    }
    let t = Target {
        root: args.root,
        dry_run: args.dry_run,
        systemd: install::systemd_running(),
    };
    need_root_user(&t)?;
    install::install(
        &t,
        &InstallOptions {
            config: args.config,
            binary: exe,
        },
        &mut std::io::stdout().lock(),
    )?;
    Ok(0)
}

pub fn run_uninstall(args: UninstallArgs) -> anyhow::Result<i32> {
    let t = Target {
        root: args.root,
        dry_run: args.dry_run,
        systemd: install::systemd_running(),
    };
    need_root_user(&t)?;
    install::uninstall(&t, args.purge, &mut std::io::stdout().lock())?;
    Ok(0)
}
