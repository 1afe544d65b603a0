//! The event record: one per connection (and, as the pipeline grows, per
//! request, DNS query and admin action), in the shape `guard-agent events
//! --json` prints.
//!
//! An event holds attribution and metadata only. Content that reaches an
//! event must already be masked; nothing in this file unmasks or derives
//! anything from raw payloads.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::proc::Ancestor;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// One redirected TCP connection, recorded when it closes.
    Connection,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Connection => "connection",
        }
    }
}

/// What happened to the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Forwarded to its destination.
    Allow,
    /// Refused by policy.
    Block,
    /// Could not be forwarded (upstream refused, unreachable, unknown
    /// original destination); the client saw a reset.
    Error,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Block => "block",
            Verdict::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "allow" => Some(Verdict::Allow),
            "block" => Some(Verdict::Block),
            "error" => Some(Verdict::Error),
            _ => None,
        }
    }
}

/// One recorded event. Field names are the `--json` output's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Store-wide unique, increasing id (0 until stored).
    pub id: u64,
    /// When it started (for a connection: when it was accepted).
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
    pub kind: EventKind,
    /// Process id (thread group id) that made the connection.
    pub pid: Option<u32>,
    /// Thread that called `connect()`.
    pub tid: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub user: Option<String>,
    pub comm: Option<String>,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    #[serde(default)]
    pub ancestors: Vec<Ancestor>,
    /// cgroup v2 path (relative to the hierarchy's root).
    pub cgroup: Option<String>,
    pub cgroup_id: Option<u64>,
    /// systemd unit or `container:ID`.
    pub unit: Option<String>,
    /// The client's address as the agent saw it.
    pub src: Option<String>,
    /// The original destination, `ip:port` (`[v6]:port`).
    pub dst: Option<String>,
    /// Destination host name when known (SNI, Host, DNS).
    pub host: Option<String>,
    pub verdict: Verdict,
    pub bytes_out: u64,
    pub bytes_in: u64,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub closed_at: Option<OffsetDateTime>,
    pub duration_ms: Option<f64>,
    /// Why it failed, in words.
    pub error: Option<String>,
}

impl Event {
    /// A connection event with nothing but its start time filled in.
    pub fn connection(ts: OffsetDateTime) -> Self {
        Self {
            id: 0,
            ts,
            kind: EventKind::Connection,
            pid: None,
            tid: None,
            uid: None,
            gid: None,
            user: None,
            comm: None,
            exe: None,
            cmdline: None,
            ancestors: Vec::new(),
            cgroup: None,
            cgroup_id: None,
            unit: None,
            src: None,
            dst: None,
            host: None,
            verdict: Verdict::Allow,
            bytes_out: 0,
            bytes_in: 0,
            closed_at: None,
            duration_ms: None,
            error: None,
        }
    }
}
