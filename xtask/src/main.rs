//! Guard's own tasks: `cargo xtask <task>`.
//!
//! - `build-ebpf`: build the kernel programs and install the object the agent
//!   embeds (`guard-agent/ebpf/guard.bpf.o`).
//! - `check-ebpf`: rebuild from source and fail if the committed object's
//!   instructions differ (then install the fresh build for the tests).
//! - `test`: build the agent and run every test (root: the end-to-end tests
//!   load kernel programs).
//! - `ci`: fmt, clippy, check-ebpf, test — what `.ci/run` runs.
//! - `demo`: the end-to-end demonstration in the README.
//! - `bench`: direct vs through Guard (L4), and direct vs Guard vs mitmproxy
//!   (HTTPS), in one run; prints a report.
//! - `package`: a .deb (cargo-deb) with the binary, unit, config, policies.

mod bench;
mod bench_https;
mod bench_relay;
mod bench_tls_relay;
mod demo;
mod ebpf;
mod package;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Guard's build, test, demo and bench tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the kernel programs and install guard-agent/ebpf/guard.bpf.o.
    BuildEbpf,
    /// Rebuild the kernel programs; fail if the committed object is stale.
    CheckEbpf,
    /// Build and run all tests (as root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// fmt, clippy, check-ebpf and the tests: what CI runs.
    Ci,
    /// Run the end-to-end demo (as root).
    Demo,
    /// Benchmark direct vs through Guard and print a report (as root).
    Bench(bench::BenchArgs),
    /// Build a .deb of the agent (needs `cargo install cargo-deb --locked`).
    Package,
    /// The bench's client workload (spawned by `bench`, prints JSON).
    #[command(hide = true)]
    BenchClient(bench::ClientArgs),
    /// The L4 bench's reference relay (spawned by `bench`).
    #[command(hide = true)]
    BenchRelay(bench_relay::RelayArgs),
    /// The HTTPS bench's reference TLS-terminating relay (spawned by `bench`).
    #[command(hide = true)]
    BenchTlsRelay(bench_tls_relay::TlsRelayArgs),
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Runs a command in the workspace root, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("cannot run {shown}"))?;
    if !st.success() {
        bail!("{shown} failed ({st})");
    }
    Ok(())
}

/// `cargo` as invoked by this xtask.
pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root: it loads eBPF programs and creates cgroups (try: sudo -E cargo xtask ...)");
    }
    Ok(())
}

fn test(args: &[String]) -> anyhow::Result<()> {
    require_root("the test suite")?;
    run(cargo().args(["build", "--package", "guard-agent", "--bins"]))?;
    // Stream cargo's output and add one closing line over every test binary
    // (cargo's own last line is often a doc-test run with nothing in it).
    let mut child = cargo()
        .args(["test", "--workspace"])
        .args(args)
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().expect("piped");
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split([';', '.']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next(), words.next()) {
                    match (n.parse::<u64>(), what) {
                        (Ok(n), "passed") => passed += n,
                        (Ok(n), "failed") => failed += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let st = child.wait()?;
    println!("summary: {passed} passed, {failed} failed");
    if !st.success() {
        bail!("cargo test failed ({st})");
    }
    Ok(())
}

fn ci() -> anyhow::Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    ebpf::check()?;
    test(&[])
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.task {
        Task::BuildEbpf => ebpf::build_and_install(),
        Task::CheckEbpf => ebpf::check(),
        Task::Test { args } => test(&args),
        Task::Ci => ci(),
        Task::Demo => require_root("the demo").and_then(|_| demo::run()),
        Task::Bench(a) => require_root("the benchmark").and_then(|_| bench::run(a)),
        Task::BenchClient(a) => bench::client(a),
        Task::BenchRelay(a) => bench_relay::main(a),
        Task::BenchTlsRelay(a) => bench_tls_relay::main(a),
        Task::Package => package::run_package(),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
