//! Building the kernel programs and checking the committed object.
//!
//! Two toolchains are supported: Debian's `rustc` with its prebuilt `core`
//! for `bpfel-unknown-none` (packages rustc-web and libstd-rust-web-dev-bpf;
//! what CI uses), and rustup nightly with `rust-src` (`-Z build-std=core`).
//! Both need `bpf-linker` on PATH (see .ci/install-toolchain).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context};

use crate::root;

/// Where the agent embeds the object from (committed).
pub fn installed_object() -> PathBuf {
    root().join("guard-agent/ebpf/guard.bpf.o")
}

fn built_object() -> PathBuf {
    root().join("guard-ebpf/target/bpfel-unknown-none/release/guard")
}

fn debian_rustc() -> Option<PathBuf> {
    let rustc = Path::new("/usr/bin/rustc");
    let core = Path::new("/usr/lib/rustlib/bpfel-unknown-none");
    (rustc.exists() && core.exists()).then(|| rustc.to_owned())
}

fn nightly_with_rust_src() -> bool {
    Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false)
}

fn have_bpf_linker() -> bool {
    Command::new("bpf-linker").arg("--version").output().is_ok()
}

/// Builds the kernel programs; returns the path of the fresh object.
pub fn build() -> anyhow::Result<PathBuf> {
    if !have_bpf_linker() {
        bail!("bpf-linker is not on PATH: run `bash .ci/install-toolchain` (Debian) or `cargo install bpf-linker`");
    }
    let dir = root().join("guard-ebpf");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTC_WRAPPER");
    if let Some(rustc) = debian_rustc() {
        cmd.env("RUSTC", rustc).env("RUSTC_BOOTSTRAP", "1").args([
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
        ]);
    } else if nightly_with_rust_src() {
        cmd.env_remove("RUSTC").args([
            "+nightly",
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ]);
    } else {
        bail!(
            "no toolchain for bpfel-unknown-none: install Debian's rustc-web and libstd-rust-web-dev-bpf \
             (bash .ci/install-toolchain), or `rustup toolchain install nightly --component rust-src`"
        );
    }
    let shown = format!("{cmd:?}");
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {shown}"))?;
    if !st.success() {
        bail!("building the kernel programs failed: {shown}");
    }
    Ok(built_object())
}

pub fn build_and_install() -> anyhow::Result<()> {
    let fresh = build()?;
    std::fs::copy(&fresh, installed_object()).context("installing the object")?;
    println!("installed {}", installed_object().display());
    Ok(())
}

fn objdump() -> anyhow::Result<String> {
    for c in [
        "llvm-objdump-22",
        "/usr/lib/llvm-22/bin/llvm-objdump",
        "llvm-objdump",
    ] {
        if Command::new(c).arg("--version").output().is_ok() {
            return Ok(c.to_owned());
        }
    }
    bail!("llvm-objdump not found (apt-get install llvm-22)")
}

/// Symbol names without the crate disambiguator Rust's v0 mangling puts in
/// them (`_RNvNtCsiUx22QdHYAn_5guard3udp4udp4`): it hashes the crate's
/// path, so the same source built in another checkout names its functions
/// differently while every instruction is the same.
fn without_crate_hashes(text: &str) -> String {
    static CRATE_HASH: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    CRATE_HASH
        .get_or_init(|| regex::Regex::new(r"(_R[0-9A-Za-z_]*?)Cs[0-9A-Za-z]+_").expect("valid"))
        .replace_all(text, "${1}Cs_")
        .into_owned()
}

/// The object's instructions and relocations, without file names or
/// path-dependent symbol hashes.
pub fn disassemble(obj: &Path) -> anyhow::Result<String> {
    let out = Command::new(objdump()?)
        .args(["-d", "-r", "--no-show-raw-insn"])
        .arg(obj)
        .output()
        .context("running llvm-objdump")?;
    if !out.status.success() {
        bail!("llvm-objdump failed on {}", obj.display());
    }
    let text = without_crate_hashes(&String::from_utf8_lossy(&out.stdout));
    Ok(text
        .lines()
        .filter(|l| !l.contains("file format"))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Rebuilds and compares with the committed object; installs the fresh one.
pub fn check() -> anyhow::Result<()> {
    let committed = installed_object();
    let before = disassemble(&committed).context("disassembling the committed object")?;
    let fresh = build()?;
    let after = disassemble(&fresh)?;
    if before != after {
        let stale = root().join("target/guard.bpf.o.fresh");
        let _ = std::fs::create_dir_all(root().join("target"));
        let _ = std::fs::copy(&fresh, &stale);
        bail!(
            "the committed kernel object {} is stale: its instructions differ from a fresh build of guard-ebpf. \
             Run `cargo xtask build-ebpf` and commit the result (fresh build left at {})",
            committed.display(),
            stale.display()
        );
    }
    std::fs::copy(&fresh, &committed).context("installing the fresh object")?;
    println!(
        "kernel object up to date ({} lines of instructions)",
        after.lines().count()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::without_crate_hashes;

    #[test]
    fn crate_hashes_of_two_checkouts_compare_equal() {
        let a = "0000 <_RNvNtCsiUx22QdHYAn_5guard3udp4udp4>:\n if r8 == 0x0 goto +0xd0 <_RNvNtCsiUx22QdHYAn_5guard3udp4udp4+0x6d8>";
        let b = "0000 <_RNvNtCs17Tt7QwrQtb_5guard3udp4udp4>:\n if r8 == 0x0 goto +0xd0 <_RNvNtCs17Tt7QwrQtb_5guard3udp4udp4+0x6d8>";
        assert_eq!(without_crate_hashes(a), without_crate_hashes(b));
        // Instructions still count.
        let c = b.replace("0xd0", "0xd1");
        assert_ne!(without_crate_hashes(a), without_crate_hashes(&c));
    }
}
