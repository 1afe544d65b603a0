//! `guard-agent ca export|install|uninstall`: the local CA that signs the
//! certificates the agent presents to intercepted clients.
//!
//! `export` prints the certificate (never the key). `install` and
//! `uninstall` add it to or remove it from the system trust store
//! (update-ca-certificates on Debian/Ubuntu, update-ca-trust on Fedora).
//! The CA is created by the agent's first start; these commands only read it.

use anyhow::Context;
use clap::{Args, Subcommand};

use super::StateDirArg;
use crate::tls::{ca::LocalCa, trust_store::TrustStore};

#[derive(Debug, Args)]
pub struct CaArgs {
    #[command(subcommand)]
    pub command: CaCommand,
    #[command(flatten)]
    pub state: StateDirArg,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the CA certificate (PEM).
    Export,
    /// Add the CA to the system trust store.
    Install,
    /// Remove the CA from the system trust store.
    Uninstall,
}

pub fn run(args: CaArgs) -> anyhow::Result<i32> {
    let dir = args.state.state_dir.join("ca");
    let load = || {
        LocalCa::load(&dir).with_context(|| {
            format!(
                "no Guard CA in {} (the agent creates it on its first start)",
                dir.display()
            )
        })
    };
    match args.command {
        CaCommand::Export => print!("{}", load()?.export_pem()),
        CaCommand::Install => {
            let done = TrustStore::system().install(&load()?)?;
            println!("installed {} ({:?})", done.anchor.display(), done.kind);
        }
        CaCommand::Uninstall => match TrustStore::system().uninstall()? {
            Some(p) => println!("removed {}", p.display()),
            None => println!("the Guard CA was not installed"),
        },
    }
    Ok(0)
}
