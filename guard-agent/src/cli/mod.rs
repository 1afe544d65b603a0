//! The command line: `guard-agent run | events | status | exec | policy |
//! approvals | approve | deny | revoke`.
//!
//! Commands other than `run` talk to the running agent through the admin
//! socket; `events` falls back to reading the store directly when no agent
//! runs. Errors are reported with anyhow at this edge only.

mod approvals;
mod ca;
mod detach;
mod events;
mod events_export;
mod events_show;
mod exec;
mod har;
mod install;
mod policy;
mod report;
mod status;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::{AgentConfig, ConfigFile, ConfigFlags, DEFAULT_STATE_DIR};

/// Guard: see and control what leaves this host.
#[derive(Debug, Parser)]
#[command(name = "guard-agent", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: load the kernel programs, intercept, record.
    Run(Box<RunArgs>),
    /// List recorded events (connections and HTTP requests), newest last.
    Events(events::EventsArgs),
    /// Show the running agent's programs, scopes, counters and store.
    Status(status::StatusArgs),
    /// Run a command in a fresh monitored cgroup of the running agent.
    Exec(exec::ExecArgs),
    /// Check a policy directory, or explain a decision for one request.
    Policy(policy::PolicyArgs),
    /// The local CA: export its certificate, add it to or remove it from the system trust store.
    Ca(ca::CaArgs),
    /// List requests held for approval (`--follow`: as they come), or `grants`.
    Approvals(approvals::ApprovalsArgs),
    /// Let a held request through (`--for 15m --scope host`: and later ones).
    Approve(approvals::ApproveArgs),
    /// Refuse a held request (its client gets a 403).
    Deny(approvals::DenyArgs),
    /// End a scoped approval (grant) before it expires.
    Revoke(approvals::RevokeArgs),
    /// Install Guard as a systemd service (unit, /etc/guard, group, CA) and start it.
    Install(install::InstallArgs),
    /// Stop and remove the service and what install wrote (the store stays unless --purge).
    Uninstall(install::UninstallArgs),
    /// Summarise a time window (a CI job): destinations, processes, blocked and masked.
    Report(report::ReportArgs),
    /// Take the kernel programs a stopped agent left attached (fail closed) off the cgroups.
    Detach(detach::DetachArgs),
}

/// Where the state (store, admin socket) lives.
#[derive(Debug, Args, Clone)]
pub struct StateDirArg {
    /// State directory of the agent (event store, admin socket).
    #[arg(long, global = true, env = "GUARD_STATE_DIR", default_value = DEFAULT_STATE_DIR, value_name = "DIR")]
    pub state_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (RON); flags override its fields.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// State directory (event store, admin socket).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Listener for redirected connections (repeatable: one IPv4, one IPv6).
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<String>,
    /// cgroup v2 directory whose processes are monitored (repeatable).
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<PathBuf>,
    /// Parent cgroup for `guard-agent exec` (default: <cgroup2>/guard-exec).
    #[arg(long, value_name = "PATH")]
    pub exec_cgroup: Option<PathBuf>,
    /// Monitor only these uids (repeatable; default: every uid).
    #[arg(long = "uid", value_name = "N")]
    pub uids: Vec<u32>,
    /// Destination prefix to intercept (repeatable; default: everything).
    #[arg(long, value_name = "CIDR")]
    pub intercept: Vec<String>,
    /// Destination prefix never to intercept (repeatable).
    #[arg(long, value_name = "CIDR")]
    pub exclude: Vec<String>,
    /// Directory of policy files (*.ron); default: the built-in default policy.
    #[arg(long, value_name = "DIR")]
    pub policy_dir: Option<PathBuf>,
    /// Extra CA certificate (PEM) to trust for upstream TLS (repeatable).
    #[arg(long = "upstream-root", value_name = "FILE")]
    pub upstream_roots: Vec<PathBuf>,
    /// SNI glob to splice without decryption (repeatable), e.g. '*.bank.example'.
    #[arg(long, value_name = "GLOB")]
    pub tls_passthrough: Vec<String>,
    /// Do not terminate TLS: splice all TLS, recording the SNI.
    #[arg(long)]
    pub no_inspect_tls: bool,
    /// Group allowed to use the admin socket besides root (default: guard).
    #[arg(long, value_name = "NAME")]
    pub admin_group: Option<String>,
    /// Group allowed to list/approve/deny holds and read events besides root
    /// (default: the admin group).
    #[arg(long, value_name = "NAME")]
    pub approver_group: Option<String>,
    /// Program run for each new hold (summary JSON on stdin, GUARD_HOLD_* env).
    #[arg(long, value_name = "PROGRAM")]
    pub notify_command: Option<String>,
    /// URL that receives a Slack-compatible {"text": ...} for each new hold.
    #[arg(long, value_name = "URL")]
    pub notify_webhook: Option<String>,
    /// Secrets for credential injection (RON, root-owned, mode 0600).
    #[arg(long, value_name = "FILE")]
    pub secrets_file: Option<PathBuf>,
    /// Log as JSON lines (for log shippers; under systemd the journal is used).
    #[arg(long)]
    pub log_json: bool,
    /// Monitor every interactive login (user.slice).
    #[arg(long)]
    pub scope_interactive: bool,
    /// Monitor only this user's processes (repeatable; narrows the uid filter).
    #[arg(long = "user-name", value_name = "NAME")]
    pub user_names: Vec<String>,
    /// Monitor a systemd unit or slice and its children (repeatable), e.g. ci-runner.service.
    #[arg(long = "unit", value_name = "NAME")]
    pub units: Vec<String>,
    /// Monitor every process on the host (the cgroup2 root).
    #[arg(long)]
    pub scope_host: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (loopback only).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Resolver to forward DNS to, `IP` or `IP:PORT` (repeatable; default:
    /// the nameservers of /etc/resolv.conf).
    #[arg(long = "dns-upstream", value_name = "ADDR")]
    pub dns_upstream: Vec<String>,
    /// Where the agent's resolver listens (UDP, loopback; repeatable: one
    /// IPv4, one IPv6; default: the addresses of --listen).
    #[arg(long = "dns-listen", value_name = "ADDR")]
    pub dns_listen: Vec<String>,
    /// Leave DNS alone: no resolver, no DNS redirect.
    #[arg(long)]
    pub no_dns: bool,
    /// Fail open: monitored connects go direct once the agent's heartbeat is
    /// older than this (e.g. 5s). Default: fail closed (refused while down).
    #[arg(long, value_name = "DURATION")]
    pub fail_open_after: Option<String>,
    /// cgroup never redirected, nor its descendants, even below a monitored
    /// cgroup (repeatable).
    #[arg(long = "exclude-cgroup", value_name = "PATH")]
    pub exclude_cgroups: Vec<PathBuf>,
    /// Intercept threads, each serving the connections it accepts start to
    /// end: TLS, detectors, relaying (default: one per CPU)
    #[arg(long, value_name = "N")]
    pub worker_threads: Option<usize>,
    /// Restart without a window: hand the running agent of this state
    /// directory over (SIGUSR2: it stops accepting, drains, exits leaving
    /// the programs attached), then start and take its attachments over.
    #[arg(long)]
    pub takeover: bool,
}

/// Worker threads of the main runtime (everything but connections).
const MAIN_RUNTIME_THREADS: usize = 2;

fn run_agent(args: RunArgs) -> anyhow::Result<()> {
    crate::logging::init(args.log_json);
    let file = match &args.config {
        Some(p) => Some((p.as_path(), ConfigFile::load(p)?)),
        None => None,
    };
    let flags = ConfigFlags {
        state_dir: args.state_dir,
        listen: args.listen,
        cgroups: args.cgroups,
        exec_cgroup: args.exec_cgroup,
        uids: args.uids,
        intercept: args.intercept,
        exclude: args.exclude,
        policy_dir: args.policy_dir,
        upstream_roots: args.upstream_roots,
        tls_passthrough: args.tls_passthrough,
        no_inspect_tls: args.no_inspect_tls,
        dns: crate::dns::settings::DnsFlags {
            upstream: args.dns_upstream,
            listen: args.dns_listen,
            no_dns: args.no_dns,
        },
        admin_group: args.admin_group,
        approver_group: args.approver_group,
        notify_command: args.notify_command,
        notify_webhook: args.notify_webhook,
        secrets_file: args.secrets_file,
        scope: crate::scope::ScopeConfig {
            interactive: args.scope_interactive,
            users: args.user_names,
            units: args.units,
            host: args.scope_host,
        },
        metrics: args.metrics,
        fail_open_after: args.fail_open_after,
        exclude_cgroups: args.exclude_cgroups,
        takeover: args.takeover,
        worker_threads: args.worker_threads,
    };
    let cfg = AgentConfig::build(file, flags)?;
    // Connections run on intercept threads of their own
    // (`intercept::workers`); this runtime serves the admin socket, the
    // store writer, DNS and metrics.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(MAIN_RUNTIME_THREADS)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(crate::daemon::run(cfg))?;
    Ok(())
}

/// Entry point; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Run(a) => run_agent(*a).map(|_| 0),
        Command::Events(a) => events::run(a).map(|_| 0),
        Command::Status(a) => status::run(a).map(|_| 0),
        Command::Detach(a) => detach::run(a).map(|_| 0),
        Command::Exec(a) => exec::run(a),
        Command::Policy(a) => policy::run(a),
        Command::Ca(a) => ca::run(a),
        Command::Approvals(a) => approvals::list(a).map(|_| 0),
        Command::Approve(a) => approvals::approve(a).map(|_| 0),
        Command::Deny(a) => approvals::deny(a).map(|_| 0),
        Command::Revoke(a) => approvals::revoke(a).map(|_| 0),
        Command::Install(a) => install::run_install(a),
        Command::Uninstall(a) => install::run_uninstall(a),
        Command::Report(a) => report::run(a),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("guard-agent: {e:#}");
            1
        }
    }
}

/// A single-threaded runtime for CLI commands.
fn cli_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

/// Explains an admin-socket connect failure.
fn socket_error(sock: &std::path::Path, e: std::io::Error) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "permission denied on {}: only root and members of the `guard` group may use the admin API",
            sock.display()
        ),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "no agent is running with state directory {} (start it with `guard-agent run`)",
            sock.parent().map(|p| p.display().to_string()).unwrap_or_default()
        ),
        _ => anyhow::anyhow!("admin socket {}: {e}", sock.display()),
    }
}
