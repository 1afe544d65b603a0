//! `cargo xtask package`: a .deb of the agent, built with cargo-deb.
//!
//! The unit and the default configuration come from the release binary
//! itself (`guard-agent install --print-unit --binary /usr/bin/guard-agent`
//! and `--print-config`), written to `target/release/deb-assets/` and picked up by the
//! assets in `guard-agent/Cargo.toml` (`[package.metadata.deb]`): the text
//! lives in one place, `guard-agent/src/install/`. Not part of `ci`: it
//! needs `cargo install cargo-deb --locked` first.

use std::process::Command;

use anyhow::{bail, Context};

use crate::{cargo, root, run};

/// Where the deb's packaged binary lives (the unit's ExecStart).
const PACKAGED_BINARY: &str = "/usr/bin/guard-agent";

fn output_of(cmd: &mut Command) -> anyhow::Result<Vec<u8>> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .current_dir(root())
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

pub fn run_package() -> anyhow::Result<()> {
    let has_cargo_deb = cargo()
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_cargo_deb {
        bail!("cargo-deb is not installed: run `cargo install cargo-deb --locked`, then `cargo xtask package` again");
    }
    run(cargo().args(["build", "--release", "--package", "guard-agent", "--bins"]))?;
    let bin = root().join("target/release/guard-agent");
    // Generated assets live below target/release/ where cargo-deb looks for
    // built files; the .deb goes to target/package/.
    let dir = root().join("target/release/deb-assets");
    std::fs::create_dir_all(&dir)?;
    let unit = output_of(Command::new(&bin).args([
        "install",
        "--print-unit",
        "--binary",
        PACKAGED_BINARY,
    ]))?;
    std::fs::write(dir.join("guard-agent.service"), unit)?;
    let config = output_of(Command::new(&bin).args(["install", "--print-config"]))?;
    std::fs::write(dir.join("agent.ron"), config)?;
    run(cargo().args([
        "deb",
        "--package",
        "guard-agent",
        "--no-build",
        "--strip",
        "--output",
        "target/package/",
    ]))?;
    println!(
        "packaged: the .deb is in {}",
        root().join("target/package").display()
    );
    Ok(())
}
