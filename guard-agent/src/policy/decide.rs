//! The hot path: request facts in, a decision out. First matching rule wins;
//! if none matches, the policy's default applies. Nothing here parses or
//! allocates beyond cloning a few `Arc`s into the `Decision`.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::compile::{CompiledMatch, CompiledPolicy, CompiledRule, DetectorSet, PatternSet};
use super::schema::{Mode, Protocol};

/// What the agent knows about a connection or request when it asks policy.
/// Fields left `None`/empty do not match any rule condition on them.
///
/// It holds detector names only, never the values that were found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestFacts {
    /// Executable path of the process that opened the connection.
    pub exe: Option<String>,
    pub comm: Option<String>,
    /// Executable paths of the ancestors, parent first.
    pub ancestors: Vec<String>,
    pub user: Option<String>,
    /// Names of the user's groups (primary and supplementary).
    pub groups: Vec<String>,
    pub uid: Option<u32>,
    /// cgroup v2 path, e.g. `/user.slice/user-1000.slice/session-2.scope`.
    pub cgroup: Option<String>,
    pub systemd_unit: Option<String>,
    /// Host name from SNI or the Host header, without port.
    pub dest_host: Option<String>,
    pub dest_ip: Option<IpAddr>,
    pub dest_port: Option<u16>,
    pub protocol: Option<Protocol>,
    pub method: Option<String>,
    /// Request path; a query string, if present, is ignored.
    pub path: Option<String>,
    pub findings: Vec<FindingFact>,
}

/// One DLP finding, by name: which detector fired and whether the request
/// goes to that secret's own service (computed by the caller).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FindingFact {
    pub detector: String,
    #[serde(default)]
    pub goes_home: bool,
}

impl FindingFact {
    pub fn new(detector: &str, goes_home: bool) -> Self {
        FindingFact {
            detector: detector.to_owned(),
            goes_home,
        }
    }
}

/// The compiled form of an action, as the caller acts on it.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Allow,
    Block {
        reason: Arc<str>,
    },
    Mask(MaskScope),
    /// Hold for a human (see the `approval` module); a timeout denies.
    RequireApproval {
        timeout: Duration,
        reason: Arc<str>,
    },
    AuditOnly,
}

/// Which findings a `Mask` verdict masks.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskScope {
    /// Detector names (groups already expanded), sorted; `None` means all.
    pub detectors: Option<Arc<[Arc<str>]>>,
    /// Leave findings that go to their own service unmasked.
    pub except_home: bool,
}

impl MaskScope {
    /// Whether a finding of `detector` must be masked.
    pub fn applies_to(&self, detector: &str, goes_home: bool) -> bool {
        if self.except_home && goes_home {
            return false;
        }
        match &self.detectors {
            None => true,
            Some(names) => names.binary_search_by(|n| n.as_ref().cmp(detector)).is_ok(),
        }
    }
}

impl Verdict {
    /// `Allow`, `Block`, … without arguments.
    pub fn kind(&self) -> &'static str {
        match self {
            Verdict::Allow => "Allow",
            Verdict::Block { .. } => "Block",
            Verdict::Mask(_) => "Mask",
            Verdict::RequireApproval { .. } => "RequireApproval",
            Verdict::AuditOnly => "AuditOnly",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Block { reason } => write!(f, "Block ({reason})"),
            Verdict::Mask(scope) => {
                match &scope.detectors {
                    None => f.write_str("Mask (all findings")?,
                    Some(names) => {
                        let names: Vec<&str> = names.iter().map(|n| n.as_ref()).collect();
                        write!(f, "Mask ({}", names.join(", "))?
                    }
                }
                if scope.except_home {
                    f.write_str(", except going home")?;
                }
                f.write_str(")")
            }
            Verdict::RequireApproval { timeout, reason } => write!(
                f,
                "RequireApproval ({reason}, timeout {})",
                humantime::format_duration(*timeout)
            ),
            other => f.write_str(other.kind()),
        }
    }
}

/// The outcome of policy for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// What the caller does. In monitor mode this is `Allow` or `AuditOnly`:
    /// monitor changes nothing.
    pub action: Verdict,
    /// Name of the rule that matched, or `"default"`.
    pub rule: Arc<str>,
    pub mode: Mode,
    /// In monitor mode, what enforce mode would have done; `None` otherwise.
    pub would_have: Option<Verdict>,
    pub reason: Arc<str>,
}

/// The rule name a decision carries when no rule matched.
pub const DEFAULT_RULE: &str = "default";

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} by rule `{}`", self.action, self.rule)?;
        if let Some(would) = &self.would_have {
            write!(f, " (monitor mode; enforce would have: {would})")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// A rule condition, named as in the policy language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    Exe,
    Comm,
    Ancestor,
    User,
    Group,
    Uid,
    Cgroup,
    Unit,
    Host,
    Cidr,
    Port,
    Protocol,
    Method,
    Path,
    Findings,
    LeavingHome,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Exe => "exe",
            Condition::Comm => "comm",
            Condition::Ancestor => "ancestor",
            Condition::User => "user",
            Condition::Group => "group",
            Condition::Uid => "uid",
            Condition::Cgroup => "cgroup",
            Condition::Unit => "unit",
            Condition::Host => "host",
            Condition::Cidr => "cidr",
            Condition::Port => "port",
            Condition::Protocol => "protocol",
            Condition::Method => "method",
            Condition::Path => "path",
            Condition::Findings => "findings",
            Condition::LeavingHome => "leaving_home",
        }
    }
}

/// How one rule fared against the facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RuleCheck {
    Matched,
    /// A `when` condition did not hold.
    Failed(Condition),
    /// `when` held, and so did `unless`.
    Excepted,
}

impl CompiledRule {
    pub(crate) fn check(&self, facts: &RequestFacts) -> RuleCheck {
        if let Some(c) = self.when.first_mismatch(facts) {
            return RuleCheck::Failed(c);
        }
        match &self.unless {
            Some(unless) if unless.first_mismatch(facts).is_none() => RuleCheck::Excepted,
            _ => RuleCheck::Matched,
        }
    }
}

fn opt_glob(set: &Option<PatternSet>, value: Option<&str>) -> bool {
    match set {
        None => true,
        Some(set) => value.is_some_and(|v| set.globs.is_match(v)),
    }
}

impl CompiledMatch {
    /// The first condition (cheapest first) that the facts fail, if any.
    pub(crate) fn first_mismatch(&self, f: &RequestFacts) -> Option<Condition> {
        if !self.port.is_empty()
            && !f
                .dest_port
                .is_some_and(|p| self.port.iter().any(|r| r.contains(p)))
        {
            return Some(Condition::Port);
        }
        if !self.protocol.is_empty() && !f.protocol.is_some_and(|p| self.protocol.contains(&p)) {
            return Some(Condition::Protocol);
        }
        if !self.uid.is_empty() && !f.uid.is_some_and(|u| self.uid.contains(&u)) {
            return Some(Condition::Uid);
        }
        if !self.method.is_empty()
            && !f
                .method
                .as_deref()
                .is_some_and(|m| self.method.iter().any(|x| x.eq_ignore_ascii_case(m)))
        {
            return Some(Condition::Method);
        }
        if !self.comm.is_empty()
            && !f
                .comm
                .as_deref()
                .is_some_and(|c| self.comm.iter().any(|x| x == c))
        {
            return Some(Condition::Comm);
        }
        if !self.user.is_empty()
            && !f
                .user
                .as_deref()
                .is_some_and(|u| self.user.iter().any(|x| x == u))
        {
            return Some(Condition::User);
        }
        if !self.group.is_empty() && !f.groups.iter().any(|g| self.group.contains(g)) {
            return Some(Condition::Group);
        }
        if !self.cidr.is_empty()
            && !f
                .dest_ip
                .is_some_and(|ip| self.cidr.iter().any(|n| n.contains(&ip)))
        {
            return Some(Condition::Cidr);
        }
        if let Some(set) = &self.findings {
            if !f.findings.iter().any(|x| set.contains(&x.detector)) {
                return Some(Condition::Findings);
            }
        }
        if let Some(set) = &self.leaving_home {
            if !f
                .findings
                .iter()
                .any(|x| !x.goes_home && set.contains(&x.detector))
            {
                return Some(Condition::LeavingHome);
            }
        }
        if !opt_glob(&self.host, f.dest_host.as_deref().map(normalize_host)) {
            return Some(Condition::Host);
        }
        if !opt_glob(&self.path, f.path.as_deref().map(strip_query)) {
            return Some(Condition::Path);
        }
        if !opt_glob(&self.exe, f.exe.as_deref()) {
            return Some(Condition::Exe);
        }
        if let Some(set) = &self.ancestor {
            if !f.ancestors.iter().any(|a| set.globs.is_match(a)) {
                return Some(Condition::Ancestor);
            }
        }
        if !opt_glob(&self.cgroup, f.cgroup.as_deref()) {
            return Some(Condition::Cgroup);
        }
        if !opt_glob(&self.unit, f.systemd_unit.as_deref()) {
            return Some(Condition::Unit);
        }
        None
    }
}

impl DetectorSet {
    pub(crate) fn contains(&self, detector: &str) -> bool {
        match self {
            DetectorSet::Any => true,
            DetectorSet::Names(names) => {
                names.binary_search_by(|n| n.as_ref().cmp(detector)).is_ok()
            }
        }
    }
}

/// `Example.COM.` and `example.com` are the same host (globs are
/// case-insensitive; this drops the root dot).
pub(crate) fn normalize_host(host: &str) -> &str {
    host.strip_suffix('.').unwrap_or(host)
}

pub(crate) fn strip_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

impl CompiledPolicy {
    /// Decide what to do with a request. First matching rule wins.
    pub fn decide(&self, facts: &RequestFacts) -> Decision {
        let rule = self
            .rules
            .iter()
            .find(|r| r.check(facts) == RuleCheck::Matched);
        self.decision_for(rule)
    }

    /// Decide for a DNS query (`dest_host` = the name asked). Only rules
    /// whose `when` names `protocol: [Dns]` apply: a rule written for
    /// connections (ports, addresses, the policy's default) never blocks
    /// a name; the connection that follows is decided on its own. A query
    /// no DNS rule matches is answered (`Allow`, rule `default`).
    pub fn decide_dns(&self, facts: &RequestFacts) -> Decision {
        let rule = self
            .rules
            .iter()
            .filter(|r| r.when.protocol.contains(&Protocol::Dns))
            .find(|r| r.check(facts) == RuleCheck::Matched);
        match rule {
            Some(r) => self.decision_for(Some(r)),
            None => Decision {
                action: Verdict::Allow,
                rule: Arc::from(DEFAULT_RULE),
                mode: self.mode,
                would_have: None,
                reason: Arc::from("no DNS rule matched: names are answered"),
            },
        }
    }

    /// The decision `rule` (or the default, if `None`) produces in this mode.
    pub(crate) fn decision_for(&self, rule: Option<&CompiledRule>) -> Decision {
        let (name, verdict, reason) = match rule {
            Some(r) => (&r.name, &r.verdict, &r.reason),
            None => (&self.default_rule_name, &self.default, &self.default_reason),
        };
        let (action, would_have) = match self.mode {
            Mode::Enforce => (verdict.clone(), None),
            Mode::Monitor => {
                let passive = match verdict {
                    Verdict::Allow => Verdict::Allow,
                    _ => Verdict::AuditOnly,
                };
                (passive, Some(verdict.clone()))
            }
        };
        Decision {
            action,
            rule: name.clone(),
            mode: self.mode,
            would_have,
            reason: reason.clone(),
        }
    }
}
