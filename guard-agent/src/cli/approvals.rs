//! `guard-agent approvals [--follow] | approvals grants | approve | deny |
//! revoke`: the human side of just-in-time approval, over the admin socket
//! (root and the approver group only; the agent checks).

use std::{io::Write, time::Duration};

use anyhow::bail;
use clap::{Args, Subcommand};

use super::{cli_runtime, socket_error, StateDirArg};
use crate::{
    admin::{AdminClient, Request, Response},
    approval::{DecisionRequest, Grant, HoldSummary, Scope},
    config::AgentConfig,
};

#[derive(Debug, Args)]
pub struct ApprovalsArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// Keep running and print new holds as they come.
    #[arg(long)]
    pub follow: bool,
    /// Print JSON lines.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub sub: Option<ApprovalsSub>,
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsSub {
    /// Live scoped approvals (ended with `guard-agent revoke ID`).
    Grants,
}

#[derive(Debug, Args)]
pub struct ApproveArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// The hold's id (from `guard-agent approvals`).
    pub id: u64,
    /// Also let later matching requests through for this long (e.g. 15m);
    /// implies `--scope host` unless a scope is given.
    #[arg(long = "for", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub for_: Option<Duration>,
    /// What the approval covers: this request only, later requests of the
    /// same user to the same host, or held by the same rule.
    #[arg(long, value_enum)]
    pub scope: Option<Scope>,
    /// Why (recorded with the decision).
    #[arg(long, value_name = "TEXT")]
    pub note: Option<String>,
}

#[derive(Debug, Args)]
pub struct DenyArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// The hold's id (from `guard-agent approvals`).
    pub id: u64,
    /// Why (recorded, and shown to the client in its 403).
    #[arg(long, value_name = "TEXT")]
    pub note: Option<String>,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// The grant's id (from `guard-agent approvals grants`).
    pub grant_id: u64,
    #[arg(long, value_name = "TEXT")]
    pub note: Option<String>,
}

/// Sends one request and hands every response to `each` until `End`.
fn converse(
    state: &StateDirArg,
    req: Request,
    mut each: impl FnMut(Response) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let sock = AgentConfig::admin_socket(&state.state_dir);
    cli_runtime()?.block_on(async {
        let mut c = AdminClient::request(&sock, &req)
            .await
            .map_err(|e| socket_error(&sock, e))?;
        while let Some(resp) = c.next().await? {
            match resp {
                Response::Error { message } => bail!("{message}"),
                Response::End => return Ok(()),
                other => {
                    if !each(other)? {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    })
}

fn print_hold(out: &mut impl Write, h: &HoldSummary, json: bool) -> std::io::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, h)?;
        writeln!(out)?;
        return out.flush();
    }
    writeln!(
        out,
        "hold {}  waiting {}s of {}s  rule {}: {}",
        h.id,
        h.age_secs(),
        h.timeout_secs,
        h.rule,
        h.reason
    )?;
    let q = h
        .query
        .as_deref()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    writeln!(
        out,
        "  request:  {} {}://{}{}{}  ({})",
        h.method,
        h.scheme,
        h.host,
        h.path,
        q,
        h.dst.as_deref().unwrap_or("-")
    )?;
    writeln!(
        out,
        "  process:  {} (pid {}), user {} (uid {})",
        h.exe.as_deref().or(h.comm.as_deref()).unwrap_or("?"),
        h.pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
        h.user.as_deref().unwrap_or("?"),
        h.uid.map(|u| u.to_string()).unwrap_or_else(|| "?".into()),
    )?;
    if !h.ancestors.is_empty() {
        let chain: Vec<String> = h
            .ancestors
            .iter()
            .map(|a| format!("{} ({})", a.exe, a.pid))
            .collect();
        writeln!(out, "  started by: {}", chain.join(" ← "))?;
    }
    for f in &h.findings {
        writeln!(
            out,
            "  finding:  {} at {}: {}",
            f.detector, f.location, f.masked
        )?;
    }
    if let Some(b) = &h.body_preview {
        let one_line: String = b
            .chars()
            .take(200)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        writeln!(out, "  body:     {one_line}")?;
    }
    writeln!(
        out,
        "  decide:   guard-agent approve {id} [--for 15m --scope host]   |   guard-agent deny {id}",
        id = h.id
    )?;
    out.flush()
}

fn print_grant(out: &mut impl Write, g: &Grant, json: bool) -> std::io::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, g)?;
        return writeln!(out);
    }
    let left = (g.expires - time::OffsetDateTime::now_utc())
        .whole_seconds()
        .max(0);
    writeln!(
        out,
        "grant {}  {}  {}s left  by {} (uid {})  from hold {}{}",
        g.id,
        g.target(),
        left,
        g.by_user.as_deref().unwrap_or("?"),
        g.by_uid,
        g.hold_id,
        g.note
            .as_deref()
            .map(|n| format!("  note: {n}"))
            .unwrap_or_default()
    )
}

pub fn list(args: ApprovalsArgs) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let json = args.json;
    let mut n = 0usize;
    match args.sub {
        Some(ApprovalsSub::Grants) => {
            converse(&args.state, Request::Grants, |r| match r {
                Response::Grant(g) => {
                    n += 1;
                    print_grant(&mut stdout.lock(), &g, json)?;
                    Ok(true)
                }
                other => bail!("unexpected response from the agent: {other:?}"),
            })?;
            if n == 0 && !json {
                eprintln!("no live grants");
            }
        }
        None => {
            let follow = args.follow;
            converse(&args.state, Request::Approvals { follow }, |r| match r {
                Response::Hold(h) => {
                    n += 1;
                    print_hold(&mut stdout.lock(), &h, json)?;
                    Ok(true)
                }
                other => bail!("unexpected response from the agent: {other:?}"),
            })?;
            if follow {
                bail!("the agent stopped");
            }
            if n == 0 && !json {
                eprintln!("no requests are waiting for approval");
            }
        }
    }
    Ok(())
}

fn decide(state: &StateDirArg, id: u64, decision: DecisionRequest) -> anyhow::Result<()> {
    converse(state, Request::Decide { id, decision }, |r| match r {
        Response::Decided {
            id,
            approved,
            grant,
        } => {
            match (approved, grant) {
                (true, Some(g)) => println!(
                    "hold {id} approved; grant {} ({}) until {} (`guard-agent revoke {}` ends it)",
                    g.id,
                    g.target(),
                    g.expires,
                    g.id
                ),
                (true, None) => println!("hold {id} approved"),
                (false, _) => println!("hold {id} denied"),
            }
            Ok(false)
        }
        other => bail!("unexpected response from the agent: {other:?}"),
    })
}

pub fn approve(a: ApproveArgs) -> anyhow::Result<()> {
    let scope = match (a.scope, a.for_) {
        (Some(s), _) => s,
        (None, Some(_)) => Scope::Host,
        (None, None) => Scope::Request,
    };
    if scope == Scope::Request && a.for_.is_some() {
        bail!("--for needs --scope host or --scope rule (a request-scoped approval lets only the held request through)");
    }
    decide(
        &a.state,
        a.id,
        DecisionRequest {
            approve: true,
            scope,
            duration_secs: a.for_.map(|d| d.as_secs().max(1)),
            note: a.note,
        },
    )
}

pub fn deny(a: DenyArgs) -> anyhow::Result<()> {
    decide(
        &a.state,
        a.id,
        DecisionRequest {
            approve: false,
            scope: Scope::Request,
            duration_secs: None,
            note: a.note,
        },
    )
}

pub fn revoke(a: RevokeArgs) -> anyhow::Result<()> {
    converse(
        &a.state,
        Request::Revoke {
            grant_id: a.grant_id,
            note: a.note,
        },
        |r| match r {
            Response::Revoked(g) => {
                println!("grant {} ({}) revoked", g.id, g.target());
                Ok(false)
            }
            other => bail!("unexpected response from the agent: {other:?}"),
        },
    )
}
