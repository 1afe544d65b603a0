//! The admin API's messages: one JSON object per line, a request from the
//! CLI, then one or more responses from the agent.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{
    approval::{DecisionRequest, Grant, HoldSummary},
    intercept::listener::CounterSnapshot,
    store::Event,
    store::EventFilter,
};

/// What the CLI asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Matching events; with `follow`, keep streaming new ones.
    Events {
        filter: EventFilter,
        follow: bool,
    },
    /// Create a monitored cgroup and move the caller into it.
    Exec,
    /// Pending holds; with `follow`, keep streaming new ones (approvers only).
    Approvals {
        follow: bool,
    },
    /// Live grants (approvers only).
    Grants,
    /// Approve or deny a hold (approvers only).
    Decide {
        id: u64,
        decision: DecisionRequest,
    },
    /// End a grant (approvers only).
    Revoke {
        grant_id: u64,
        note: Option<String>,
    },
}

impl Request {
    /// Whether only root and the approver group may ask this: reading
    /// events (they describe other users' traffic) and deciding holds.
    pub fn needs_approver(&self) -> bool {
        !matches!(self, Request::Status | Request::Exec)
    }
}

/// What the agent answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    Status(Box<Status>),
    Event(Box<Event>),
    /// End of a (non-follow) event listing.
    End,
    /// The caller now lives in this cgroup.
    ExecCgroup {
        cgroup: PathBuf,
        /// Trust bundle (system roots + Guard CA) for the child's TLS clients.
        ca_bundle: Option<PathBuf>,
    },
    Error {
        message: String,
    },
    /// A pending hold (then `End`, unless following).
    Hold(Box<HoldSummary>),
    /// A live grant (then `End`).
    Grant(Box<Grant>),
    /// The hold was decided; an approval with a host or rule scope made `grant`.
    Decided {
        id: u64,
        approved: bool,
        grant: Option<Box<Grant>>,
    },
    Revoked(Box<Grant>),
}

/// `guard-agent status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub listen: Vec<String>,
    /// Programs attached to every scope cgroup.
    pub programs: Vec<String>,
    /// cgroups the programs are attached to.
    pub cgroups: Vec<PathBuf>,
    pub exec_cgroup: Option<PathBuf>,
    pub uids: Vec<u32>,
    pub intercept: Vec<String>,
    pub exclude: Vec<String>,
    pub counters: CounterSnapshot,
    pub store_events: u64,
    pub store_bytes: u64,
    pub store_size_on_disk: u64,
    /// Space left on the state directory's filesystem (bytes).
    #[serde(default)]
    pub store_disk_available: Option<u64>,
    /// Events the store could not write since the agent started.
    #[serde(default)]
    pub store_events_lost: u64,
    /// Why the last write failed, and when.
    #[serde(default)]
    pub store_last_error: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub store_last_error_at: Option<time::OffsetDateTime>,
    pub state_dir: PathBuf,
    /// The agent's resident memory now and at its highest (KiB).
    #[serde(default)]
    pub memory_kib: Option<u64>,
    #[serde(default)]
    pub memory_peak_kib: Option<u64>,
    /// Descriptors the agent holds, and its open-file (soft) limit.
    #[serde(default)]
    pub fds_open: Option<u64>,
    #[serde(default)]
    pub fds_limit: Option<u64>,
    /// The DNS resolver: up, where it listens, where it forwards; `None`
    /// when DNS is turned off.
    #[serde(default)]
    pub resolver: Option<crate::dns::ResolverStatus>,
    /// The policy in force: version, digest of its files, when loaded.
    #[serde(default)]
    pub policy: Option<crate::policy::PolicyStamp>,
    /// Retention of the event store.
    #[serde(default)]
    pub retention_max_age_secs: u64,
    #[serde(default)]
    pub retention_max_bytes: u64,
    /// Where Prometheus metrics are served, if anywhere.
    #[serde(default)]
    pub metrics: Option<String>,
    /// "fail-closed" or "fail-open after 5s".
    #[serde(default)]
    pub fail_mode: String,
    /// Age of the heartbeat the kernel programs see, milliseconds.
    #[serde(default)]
    pub heartbeat_age_ms: Option<u64>,
    /// bpffs directory of this instance's pinned attachments.
    #[serde(default)]
    pub pin_dir: Option<PathBuf>,
    /// Per scope cgroup: links and whether they are pinned.
    #[serde(default)]
    pub scopes: Vec<ScopeStatus>,
    /// cgroups never redirected (nor their descendants).
    #[serde(default)]
    pub excluded_cgroups: Vec<PathBuf>,
}

/// Attachment state of one scope cgroup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScopeStatus {
    pub cgroup: PathBuf,
    /// Links the agent made on it (one per program).
    pub links: usize,
    /// All of them pinned in bpffs: they stay attached if the agent dies.
    pub pinned: bool,
}
