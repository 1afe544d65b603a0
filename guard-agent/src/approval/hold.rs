//! A pending hold as `guard-agent approvals` shows it, and the decisions
//! that end one.
//!
//! A summary is built from what the event store would receive: the masked
//! path and query, masked findings and a masked body preview. It must never
//! carry a raw header value or body.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{Grant, Scope};
use crate::{proc::Ancestor, store::FindingRecord};

/// What a person deciding on a held request sees.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HoldSummary {
    /// The hold's id: the held request's event id.
    pub id: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    pub timeout_secs: u64,
    pub rule: String,
    pub reason: String,
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub user: Option<String>,
    pub comm: Option<String>,
    pub exe: Option<String>,
    #[serde(default)]
    pub ancestors: Vec<Ancestor>,
    pub cgroup: Option<String>,
    /// The original destination, `ip:port`.
    pub dst: Option<String>,
    pub host: String,
    pub method: String,
    pub scheme: String,
    /// Masked.
    pub path: String,
    /// Masked.
    pub query: Option<String>,
    /// Masked values only.
    #[serde(default)]
    pub findings: Vec<FindingRecord>,
    /// The start of the body, masked.
    pub body_preview: Option<String>,
}

impl HoldSummary {
    /// One line: who, what, where, why.
    pub fn headline(&self) -> String {
        let who = self
            .exe
            .as_deref()
            .or(self.comm.as_deref())
            .unwrap_or("unknown process");
        let user = self
            .user
            .clone()
            .or(self.uid.map(|u| format!("uid {u}")))
            .unwrap_or_else(|| "unknown user".into());
        let pid = self.pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
        let q = self
            .query
            .as_deref()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        format!(
            "{} {}://{}{}{} from {who}{pid}, user {user}; rule `{}`: {}",
            self.method, self.scheme, self.host, self.path, q, self.rule, self.reason
        )
    }

    /// Detector names found, comma-separated (or "none").
    pub fn finding_names(&self) -> String {
        if self.findings.is_empty() {
            return "none".into();
        }
        let mut names: Vec<&str> = self.findings.iter().map(|f| f.detector.as_str()).collect();
        names.dedup();
        names.join(", ")
    }

    /// Age in whole seconds.
    pub fn age_secs(&self) -> i64 {
        (OffsetDateTime::now_utc() - self.since).whole_seconds()
    }
}

/// Who decided: from the admin socket's peer credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approver {
    pub uid: u32,
    pub user: Option<String>,
}

impl Approver {
    /// The approver with uid `uid`, its name looked up in the user database.
    pub fn from_uid(uid: u32) -> Self {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        Self { uid, user }
    }
}

/// `approve` or `deny`, as sent over the admin socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecisionRequest {
    pub approve: bool,
    pub scope: Scope,
    /// How long a host or rule grant lasts (default 15 minutes).
    pub duration_secs: Option<u64>,
    pub note: Option<String>,
}

/// What is held, as recorded (masked): for a connection without HTTP,
/// `method` and `path` say so.
#[derive(Debug, Clone)]
pub struct HeldRequest {
    pub method: String,
    pub scheme: String,
    pub host: String,
    pub path: String,
    pub query: Option<String>,
    pub body_preview: Option<String>,
}

/// Why a held request was not let through.
#[derive(Debug, Clone)]
pub enum Denial {
    Denied { by: Approver, note: Option<String> },
    TimedOut { after: Duration },
}

/// How a hold ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Approved {
        by: Approver,
        note: Option<String>,
        grant: Option<Grant>,
    },
    Denied {
        by: Approver,
        note: Option<String>,
    },
    TimedOut {
        after: Duration,
    },
}
