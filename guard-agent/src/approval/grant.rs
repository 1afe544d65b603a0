//! Scoped approvals ("allow for 15 minutes"): what a grant covers and
//! whether a later request falls under it.
//!
//! A grant never widens beyond the user whose request was approved: a
//! `host` grant covers that user's later held requests to the same host, a
//! `rule` grant their later requests held by the same rule. Nothing here
//! talks to the network or the store.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// What an approval covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Only the held request itself.
    Request,
    /// Later requests of the same user to the same host.
    Host,
    /// Later requests of the same user held by the same rule.
    Rule,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Request => "request",
            Scope::Host => "host",
            Scope::Rule => "rule",
        }
    }
}

/// A live scoped approval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    pub id: u64,
    /// `Host` or `Rule` (a `Request` approval creates no grant).
    pub scope: Scope,
    /// The user whose request was approved (None: the request had no uid).
    pub uid: Option<u32>,
    pub user: Option<String>,
    /// Destination host (for `Host`; informative for `Rule`).
    pub host: String,
    /// Rule that held the request (for `Rule`; informative for `Host`).
    pub rule: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires: OffsetDateTime,
    pub by_uid: u32,
    pub by_user: Option<String>,
    pub note: Option<String>,
    /// The held request whose approval created it.
    pub hold_id: u64,
}

/// What a held request is matched against grants by.
#[derive(Debug, Clone, Copy)]
pub struct GrantQuery<'a> {
    pub uid: Option<u32>,
    pub host: &'a str,
    pub rule: &'a str,
}

impl Grant {
    /// Whether this grant lets `q` through at `now`.
    pub fn matches(&self, q: &GrantQuery<'_>, now: OffsetDateTime) -> bool {
        if now >= self.expires || self.uid != q.uid {
            return false;
        }
        match self.scope {
            Scope::Request => false,
            Scope::Host => self.host.eq_ignore_ascii_case(q.host),
            Scope::Rule => self.rule == q.rule,
        }
    }

    /// One line for tables and notifications.
    pub fn target(&self) -> String {
        let who = self
            .user
            .clone()
            .or(self.uid.map(|u| format!("uid {u}")))
            .unwrap_or_else(|| "unknown user".into());
        match self.scope {
            Scope::Host => format!("{who} → host {}", self.host),
            Scope::Rule => format!("{who} → rule {}", self.rule),
            Scope::Request => format!("{who} → one request"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(scope: Scope) -> Grant {
        let now = OffsetDateTime::now_utc();
        Grant {
            id: 1,
            scope,
            uid: Some(1000),
            user: Some("dev".into()),
            host: "api.example.com".into(),
            rule: "hold-uploads".into(),
            created: now,
            expires: now + time::Duration::minutes(15),
            by_uid: 0,
            by_user: Some("root".into()),
            note: None,
            hold_id: 7,
        }
    }

    fn q<'a>(uid: u32, host: &'a str, rule: &'a str) -> GrantQuery<'a> {
        GrantQuery {
            uid: Some(uid),
            host,
            rule,
        }
    }

    #[test]
    fn a_host_grant_covers_the_same_user_and_host_only() {
        let g = grant(Scope::Host);
        let now = OffsetDateTime::now_utc();
        assert!(g.matches(&q(1000, "api.example.com", "other-rule"), now));
        assert!(g.matches(&q(1000, "API.example.com", "hold-uploads"), now));
        assert!(!g.matches(&q(1000, "evil.example.com", "hold-uploads"), now));
        assert!(!g.matches(&q(1001, "api.example.com", "hold-uploads"), now));
    }

    #[test]
    fn a_rule_grant_covers_the_same_user_and_rule_only() {
        let g = grant(Scope::Rule);
        let now = OffsetDateTime::now_utc();
        assert!(g.matches(&q(1000, "elsewhere.example", "hold-uploads"), now));
        assert!(!g.matches(&q(1000, "api.example.com", "another-rule"), now));
        assert!(!g.matches(&q(0, "api.example.com", "hold-uploads"), now));
    }

    #[test]
    fn an_expired_grant_covers_nothing() {
        let g = grant(Scope::Host);
        let later = g.expires + time::Duration::seconds(1);
        assert!(!g.matches(&q(1000, "api.example.com", "hold-uploads"), later));
        assert!(!g.matches(&q(1000, "api.example.com", "hold-uploads"), g.expires));
    }

    #[test]
    fn a_request_scope_never_matches_later_requests() {
        let g = grant(Scope::Request);
        let now = OffsetDateTime::now_utc();
        assert!(!g.matches(&q(1000, "api.example.com", "hold-uploads"), now));
    }
}
