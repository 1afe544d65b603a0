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
    /// One HTTP request and its response, recorded when the response ends.
    Http,
    /// One DNS query and its answer, recorded when answered.
    Dns,
    /// A decision on a held request: approved, denied, timed out.
    Approval,
    /// A scoped approval (grant) created, revoked or expired.
    Grant,
    /// The policy was reloaded (or a reload failed).
    PolicyReload,
}

impl EventKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "connection" => Some(EventKind::Connection),
            "http" => Some(EventKind::Http),
            "dns" => Some(EventKind::Dns),
            "approval" => Some(EventKind::Approval),
            "grant" => Some(EventKind::Grant),
            "policy_reload" => Some(EventKind::PolicyReload),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Connection => "connection",
            EventKind::Http => "http",
            EventKind::Dns => "dns",
            EventKind::Approval => "approval",
            EventKind::Grant => "grant",
            EventKind::PolicyReload => "policy_reload",
        }
    }
}

/// What happened to the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Forwarded to its destination.
    Allow,
    /// Forwarded with sensitive content masked.
    Mask,
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
            Verdict::Mask => "mask",
            Verdict::Block => "block",
            Verdict::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "allow" => Some(Verdict::Allow),
            "mask" => Some(Verdict::Mask),
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
    /// Links the requests of one connection to it (random per connection).
    #[serde(default)]
    pub conn_id: Option<u64>,
    /// TLS as seen from the client (SNI, ALPN, version), when it spoke TLS.
    #[serde(default)]
    pub tls: Option<TlsRecord>,
    /// The request and response, for `kind: http`.
    #[serde(default)]
    pub http: Option<HttpRecord>,
    /// The policy decision that applied.
    #[serde(default)]
    pub policy: Option<PolicyRecord>,
    /// What the detectors found (masked values only).
    #[serde(default)]
    pub findings: Vec<FindingRecord>,
    /// The query and answer, for `kind: dns`.
    #[serde(default)]
    pub dns: Option<DnsRecord>,
    /// Admin side (approval, grant, policy reload events), and on a held
    /// HTTP request how its hold ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminRecord>,
}

/// One DNS exchange through the agent's resolver. The query name is masked
/// like any other recorded content (a name can carry a secret).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DnsRecord {
    /// The name asked for, lower case, without the root dot.
    pub qname: String,
    /// `A`, `AAAA`, `TXT`, ...
    pub qtype: String,
    /// `udp` or `tcp`.
    pub transport: String,
    /// Response code sent to the client (`NoError`, `NXDomain`, ...).
    pub rcode: Option<String>,
    /// Answer records as `TYPE data` (`A 127.0.0.9`, `CNAME x.example.`).
    #[serde(default)]
    pub answers: Vec<String>,
    /// The resolver that answered; none when the agent answered itself.
    pub upstream: Option<String>,
}

/// An action on the admin side, or how a hold ended: who, when (the event's
/// `ts`), what, and the note. Never holds request content.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AdminRecord {
    /// `approve`, `deny`, `timeout`, `granted` (let through by a grant),
    /// `grant`, `revoke`, `expire`, `policy_reload`, `policy_reload_failed`.
    pub action: String,
    /// Who decided (peer credentials of the admin socket).
    pub by_uid: Option<u32>,
    pub by_user: Option<String>,
    pub note: Option<String>,
    /// The held request (its HTTP event id).
    pub hold_id: Option<u64>,
    pub grant_id: Option<u64>,
    /// `request`, `host` or `rule`.
    pub scope: Option<String>,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub expires: Option<OffsetDateTime>,
    /// Anything else in words (policy version, reload error, grant target).
    pub detail: Option<String>,
}

/// TLS parameters of an intercepted connection.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TlsRecord {
    pub sni: Option<String>,
    /// ALPN negotiated with the client.
    pub alpn: Option<String>,
    pub version: Option<String>,
    /// ALPN negotiated with the upstream.
    pub upstream_alpn: Option<String>,
    pub upstream_version: Option<String>,
    /// True when the connection was spliced without decryption.
    #[serde(default)]
    pub passthrough: bool,
}

/// One HTTP exchange. Header values that carry credentials are replaced by
/// a keyed fingerprint; excerpts are taken after masking.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HttpRecord {
    pub method: String,
    pub scheme: String,
    pub host: String,
    pub path: String,
    pub query: Option<String>,
    pub version: String,
    pub status: Option<u16>,
    pub request_headers: Vec<(String, String)>,
    pub response_headers: Vec<(String, String)>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Time to the first byte of the response head, from the request head.
    pub ttfb_ms: Option<f64>,
    pub total_ms: Option<f64>,
    pub request_excerpt: Option<String>,
    pub response_excerpt: Option<String>,
    /// Protocol upgrade carried after the exchange (e.g. "websocket").
    pub upgrade: Option<String>,
    /// After an upgrade: how long the upgraded session lasted (from the
    /// 101 to its close) and the bytes it carried each way. The event of an
    /// upgraded exchange is recorded when the session ends.
    #[serde(default)]
    pub upgrade_ms: Option<f64>,
    #[serde(default)]
    pub upgrade_bytes_out: u64,
    #[serde(default)]
    pub upgrade_bytes_in: u64,
}

/// Which rule decided, and what it said.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub rule: String,
    pub action: String,
    pub mode: String,
    /// In monitor mode: what enforce mode would have done.
    pub would_have: Option<String>,
    pub reason: Option<String>,
}

/// One detector hit, without its value.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FindingRecord {
    pub detector: String,
    /// Where: `body $.user.card`, `query token`, `header x-api-key`, ...
    pub location: String,
    /// The mask the value was (or would have been) replaced with.
    pub masked: String,
    pub fingerprint: String,
    /// The secret was going to its own service.
    #[serde(default)]
    pub goes_home: bool,
    /// It was actually masked in what left the host.
    #[serde(default)]
    pub applied: bool,
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
            conn_id: None,
            tls: None,
            http: None,
            policy: None,
            findings: Vec::new(),
            dns: None,
            admin: None,
        }
    }

    /// An admin-side event (approval, grant, policy reload).
    pub fn admin(kind: EventKind, record: AdminRecord) -> Self {
        let mut e = Self::connection(OffsetDateTime::now_utc());
        e.kind = kind;
        e.admin = Some(record);
        e
    }
}
