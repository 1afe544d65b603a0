//! `guard-agent status`.

use anyhow::bail;
use clap::Args;

use super::{cli_runtime, socket_error, StateDirArg};
use crate::{
    admin::{AdminClient, Request, Response},
    config::AgentConfig,
};

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let sock = AgentConfig::admin_socket(&args.state.state_dir);
    let status = cli_runtime()?.block_on(async {
        let mut c = AdminClient::request(&sock, &Request::Status)
            .await
            .map_err(|e| socket_error(&sock, e))?;
        match c.next().await? {
            Some(Response::Status(s)) => Ok(s),
            Some(Response::Error { message }) => bail!("{message}"),
            other => bail!("unexpected response from the agent: {other:?}"),
        }
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let s = status;
    println!(
        "guard-agent {} (pid {}), up {}s",
        s.version, s.pid, s.uptime_secs
    );
    println!("listening:   {}", s.listen.join(", "));
    println!("programs:    {}", s.programs.join(", "));
    println!("attached to:");
    for c in &s.cgroups {
        println!("  {}", c.display());
    }
    if let Some(e) = &s.exec_cgroup {
        println!("exec parent: {}", e.display());
    }
    println!(
        "uids:        {}",
        if s.uids.is_empty() {
            "all".to_owned()
        } else {
            s.uids
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    println!("intercept:   {}", s.intercept.join(", "));
    println!(
        "exclude:     {}",
        if s.exclude.is_empty() {
            "(loopback and link-local by default)".to_owned()
        } else {
            s.exclude.join(", ")
        }
    );
    match &s.resolver {
        Some(r) => println!(
            "resolver:    {} on {} → {} ({} queries, {} blocked, {} flagged, {} failed)",
            if r.up { "up" } else { "DOWN" },
            r.listen.join(", "),
            if r.upstream.is_empty() {
                "no upstream".to_owned()
            } else {
                r.upstream.join(", ")
            },
            r.queries,
            r.blocked,
            r.flagged,
            r.failed
        ),
        None => println!("resolver:    off (DNS is not redirected)"),
    }
    let c = s.counters;
    println!(
        "connections: {} redirected, {} active, {} errors, {} not redirected",
        c.redirected, c.active, c.errors, c.unknown
    );
    println!(
        "store:       {} events, {} bytes of records, {} bytes on disk ({}{})",
        s.store_events,
        s.store_bytes,
        s.store_size_on_disk,
        s.state_dir.display(),
        s.store_disk_available
            .map(|b| format!(", {:.1} MiB free", b as f64 / (1 << 20) as f64))
            .unwrap_or_default()
    );
    if s.store_events_lost > 0 {
        println!(
            "             {} events could not be written (last failure {}: {}); the store stops writing after an I/O error: make room, then restart the agent",
            s.store_events_lost,
            s.store_last_error_at
                .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
                .unwrap_or_else(|| "at an unknown time".into()),
            s.store_last_error.as_deref().unwrap_or("unknown")
        );
    }
    if let (Some(now), Some(peak)) = (s.memory_kib, s.memory_peak_kib) {
        println!(
            "memory:      {:.1} MiB resident, {:.1} MiB at the most",
            now as f64 / 1024.0,
            peak as f64 / 1024.0
        );
    }
    if let (Some(open), Some(limit)) = (s.fds_open, s.fds_limit) {
        println!("files:       {open} open of {limit} allowed");
    }
    println!(
        "retention:   {} or {} bytes, whichever comes first",
        humantime::format_duration(std::time::Duration::from_secs(s.retention_max_age_secs)),
        s.retention_max_bytes
    );
    if let Some(p) = &s.policy {
        println!(
            "policy:      version {} ({}), sha256 {}, loaded {}",
            p.version,
            p.source,
            &p.sha256[..p.sha256.len().min(16)],
            p.loaded_at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        );
    }
    if let Some(m) = &s.metrics {
        println!("metrics:     http://{m}/metrics");
    }
    print_fail_mode(&s);
    Ok(())
}

/// Fail mode, heartbeat and pinned attachments (see README "When the agent
/// is down").
fn print_fail_mode(s: &crate::admin::Status) {
    if !s.fail_mode.is_empty() {
        println!("fail mode:   {}", s.fail_mode);
    }
    if let Some(ms) = s.heartbeat_age_ms {
        println!("heartbeat:   {ms} ms ago");
    }
    if let Some(p) = &s.pin_dir {
        println!("pins:        {}", p.display());
    }
    for sc in &s.scopes {
        println!(
            "  {}: {} links, {}",
            sc.cgroup.display(),
            sc.links,
            if sc.pinned {
                "attached, pinned"
            } else {
                "NOT pinned"
            }
        );
    }
    for c in &s.excluded_cgroups {
        println!("never redirected: {}", c.display());
    }
}
