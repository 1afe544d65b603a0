//! `guard-agent events`: a table for people, JSON lines for programs.

use std::io::{self, Write};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use time::OffsetDateTime;

use super::{cli_runtime, socket_error, StateDirArg};
use crate::{
    admin::{AdminClient, Request, Response},
    config::AgentConfig,
    store::{
        filter::{parse_dest, parse_time},
        Event, EventFilter, EventKind, EventStore, Verdict,
    },
};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct EventsArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    #[command(subcommand)]
    pub action: Option<EventsAction>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Keep printing new events as they are recorded.
    #[arg(long, short)]
    pub follow: bool,
    #[command(flatten)]
    pub filters: FilterArgs,
}

#[derive(Debug, Subcommand)]
pub enum EventsAction {
    /// One event in full: a request and its response the way `curl -v`
    /// prints them, or a connection and its requests.
    Show(super::events_show::ShowArgs),
    /// Write matching events to a file or stdout as NDJSON or HAR 1.2.
    Export(Box<super::events_export::ExportArgs>),
}

/// The filters of `events` and `events export`.
#[derive(Debug, Args, Clone, Default)]
pub struct FilterArgs {
    /// Only events at or after this time (RFC 3339, or an age: 10m, 2h, 1d).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only events at or before this time (RFC 3339, or an age).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Only this process id.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Only this user (name or uid).
    #[arg(long)]
    pub user: Option<String>,
    /// Only this executable (full path or file name).
    #[arg(long)]
    pub exe: Option<String>,
    /// Only this destination: HOST, *.DOMAIN, CIDR, with an optional :PORT.
    #[arg(long, value_name = "HOST|CIDR[:PORT]")]
    pub dest: Option<String>,
    /// Only this verdict: allow, mask, block, error.
    #[arg(long)]
    pub verdict: Option<String>,
    /// Only this kind: connection, http, dns, approval, grant, policy_reload.
    #[arg(long)]
    pub kind: Option<String>,
    /// Only HTTP requests (same as --kind http).
    #[arg(long)]
    pub http: bool,
    /// At most this many (the most recent).
    #[arg(long)]
    pub limit: Option<usize>,
}

impl FilterArgs {
    pub fn filter(&self) -> anyhow::Result<EventFilter> {
        let now = OffsetDateTime::now_utc();
        let t = |s: &Option<String>, flag: &str| -> anyhow::Result<Option<OffsetDateTime>> {
            s.as_deref()
                .map(|v| parse_time(v, now).map_err(|e| anyhow::anyhow!("--{flag}: {e}")))
                .transpose()
        };
        Ok(EventFilter {
            since: t(&self.since, "since")?,
            until: t(&self.until, "until")?,
            pid: self.pid,
            user: self.user.clone(),
            exe: self.exe.clone(),
            dest: self
                .dest
                .as_deref()
                .map(|d| parse_dest(d).map_err(|e| anyhow::anyhow!("--dest: {e}")))
                .transpose()?,
            verdict: match self.verdict.as_deref() {
                None => None,
                Some(v) => Some(Verdict::parse(v).ok_or_else(|| {
                    anyhow::anyhow!("--verdict: `{v}` is not one of allow, mask, block, error")
                })?),
            },
            kind: match (self.http, self.kind.as_deref()) {
                (true, _) => Some(EventKind::Http),
                (false, None) => None,
                (false, Some(k)) => Some(EventKind::parse(k).ok_or_else(|| {
                    anyhow::anyhow!("--kind: `{k}` is not one of connection, http, dns, approval, grant, policy_reload")
                })?),
            },
            limit: self.limit,
            ..Default::default()
        })
    }
}

/// Prints events as a table or JSON lines.
struct Printer {
    json: bool,
    header_done: bool,
}

fn short(s: Option<&str>, max: usize) -> String {
    let s = s.unwrap_or("-");
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let tail: String = s
            .chars()
            .rev()
            .take(max - 1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{tail}")
    }
}

impl Printer {
    fn print(&mut self, out: &mut impl Write, e: &Event) -> io::Result<()> {
        if self.json {
            serde_json::to_writer(&mut *out, e)?;
            writeln!(out)?;
            return out.flush();
        }
        if !self.header_done {
            writeln!(
                out,
                "{:>6}  {:<19}  {:>7}  {:<8}  {:<14}  {:<21}  {:<34}  {:<7}  {:>8}  {:>8}  NOTE",
                "ID", "TIME (UTC)", "PID", "USER", "EXE", "DST", "WHAT", "VERDICT", "OUT", "IN"
            )?;
            self.header_done = true;
        }
        let ts = e.ts;
        let time = format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            ts.year(),
            u8::from(ts.month()),
            ts.day(),
            ts.hour(),
            ts.minute(),
            ts.second()
        );
        let exe = e
            .exe
            .as_deref()
            .map(|x| x.rsplit('/').next().unwrap_or(x))
            .or(e.comm.as_deref());
        let (what, out_b, in_b) = match (&e.http, &e.admin) {
            (None, Some(a)) => {
                let target = a.hold_id.map(|h| format!(" hold {h}")).unwrap_or_default();
                let grant = a
                    .grant_id
                    .map(|g| format!(" grant {g}"))
                    .unwrap_or_default();
                (
                    format!("{} {}{target}{grant}", e.kind.as_str(), a.action),
                    0,
                    0,
                )
            }
            (Some(h), _) => (
                format!(
                    "{} {}{} {}",
                    h.method,
                    h.host,
                    h.path,
                    h.status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "-".into())
                ),
                h.request_bytes,
                h.response_bytes,
            ),
            (None, None) => {
                let what = match &e.tls {
                    Some(t) if t.passthrough => {
                        format!("tls {} (passthrough)", t.sni.as_deref().unwrap_or("-"))
                    }
                    Some(t) => format!("tls {}", t.sni.as_deref().unwrap_or("-")),
                    None => format!("tcp {}", e.host.as_deref().unwrap_or(""))
                        .trim_end()
                        .to_owned(),
                };
                (what, e.bytes_out, e.bytes_in)
            }
        };
        let note = match (&e.error, &e.policy) {
            (Some(err), _) => err.clone(),
            (None, _) if e.admin.is_some() => {
                let a = e.admin.as_ref().expect("checked");
                [
                    a.detail.clone(),
                    a.note.clone().map(|n| format!("note: {n}")),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("; ")
            }
            (None, Some(p)) if e.verdict != Verdict::Allow || !e.findings.is_empty() => {
                let found: Vec<&str> = e.findings.iter().map(|f| f.detector.as_str()).collect();
                format!("rule {} [{}]", p.rule, found.join(", "))
            }
            _ => String::new(),
        };
        writeln!(
            out,
            "{:>6}  {:<19}  {:>7}  {:<8}  {:<14}  {:<21}  {:<34}  {:<7}  {:>8}  {:>8}  {}",
            e.id,
            time,
            e.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            short(e.user.as_deref().or(e.uid.map(|_| "?")), 8),
            short(exe, 14),
            short(e.dst.as_deref(), 21),
            short(Some(&what), 34),
            e.verdict.as_str(),
            out_b,
            in_b,
            note
        )?;
        out.flush()
    }
}

pub fn run(args: EventsArgs) -> anyhow::Result<()> {
    match args.action {
        Some(EventsAction::Show(a)) => return super::events_show::run(&args.state, a),
        Some(EventsAction::Export(a)) => return super::events_export::run(&args.state, *a),
        None => {}
    }
    let filter = args.filters.filter()?;
    let mut printer = Printer {
        json: args.json,
        header_done: false,
    };
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let source = for_each_event(&args.state, &filter, args.follow, |e| {
        printer.print(&mut out, &e)
    })?;
    if args.follow && source == Source::Store {
        eprintln!("guard-agent: no agent is running; nothing more will be recorded");
    }
    Ok(())
}

/// Where events were read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The running agent, through the admin socket.
    Agent,
    /// The store directly (no agent runs).
    Store,
}

/// Calls `each` with every event matching `filter`, oldest first: through
/// the admin socket while the agent runs (with `follow`, until it stops),
/// straight from the store otherwise. A broken pipe from `each` ends the
/// listing quietly.
pub fn for_each_event(
    state: &StateDirArg,
    filter: &EventFilter,
    follow: bool,
    mut each: impl FnMut(Event) -> io::Result<()>,
) -> anyhow::Result<Source> {
    let sock = AgentConfig::admin_socket(&state.state_dir);
    let rt = cli_runtime()?;
    let via_agent = rt.block_on(async {
        let req = Request::Events {
            filter: filter.clone(),
            follow,
        };
        let mut client = match AdminClient::request(&sock, &req).await {
            Ok(c) => c,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(socket_error(&sock, e)),
        };
        while let Some(resp) = client.next().await? {
            match resp {
                Response::Event(e) => {
                    if let Err(e) = each(*e) {
                        if e.kind() == io::ErrorKind::BrokenPipe {
                            return Ok(true);
                        }
                        return Err(e.into());
                    }
                }
                Response::End => return Ok(true),
                Response::Error { message } => bail!("{message}"),
                other => bail!("unexpected response from the agent: {other:?}"),
            }
        }
        if follow {
            bail!("the agent stopped");
        }
        Ok(true)
    })?;
    if via_agent {
        return Ok(Source::Agent);
    }

    // No agent: read the store directly.
    let path = AgentConfig::store_dir(&state.state_dir);
    if !path.exists() {
        bail!(
            "no event store at {} (has the agent run with this state directory?)",
            path.display()
        );
    }
    let store = EventStore::open(&path)
        .with_context(|| "reading the store directly (no agent is running)")?;
    for e in store.query(filter)? {
        if let Err(e) = each(e) {
            if e.kind() == io::ErrorKind::BrokenPipe {
                break;
            }
            return Err(e.into());
        }
    }
    Ok(Source::Store)
}

/// Every event matching `filter`: through the admin socket when an agent
/// runs, else straight from the store (for `report`).
pub(crate) fn load_events(
    state_dir: &std::path::Path,
    filter: &EventFilter,
) -> anyhow::Result<Vec<Event>> {
    let state = StateDirArg {
        state_dir: state_dir.to_owned(),
    };
    let mut events = Vec::new();
    for_each_event(&state, filter, false, |e| {
        events.push(e);
        Ok(())
    })?;
    Ok(events)
}
