//! Event filters: what `guard-agent events` can ask for (`--since`,
//! `--until`, `--pid`, `--user`, `--exe`, `--dest`, `--verdict`, `--limit`,
//! one event by id, the events of one connection),
//! parsed once and matched against stored events.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use super::event::{Event, EventKind, Verdict};

/// A destination filter: a host (glob with `*`) or a CIDR, with an optional port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DestFilter {
    pub target: DestTarget,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DestTarget {
    Net(IpNet),
    Host(String),
}

/// Everything an `events` query can filter on; all fields optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EventFilter {
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub since: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub until: Option<OffsetDateTime>,
    pub pid: Option<u32>,
    pub user: Option<String>,
    pub exe: Option<String>,
    pub dest: Option<DestFilter>,
    pub verdict: Option<Verdict>,
    /// Only this kind of event.
    #[serde(default)]
    pub kind: Option<EventKind>,
    /// At most this many events: the most recent ones.
    pub limit: Option<usize>,
    /// Only the event with this id (`events show ID`).
    #[serde(default)]
    pub id: Option<u64>,
    /// Only events of this connection (a connection and its requests).
    #[serde(default)]
    pub conn_id: Option<u64>,
}

/// Parses `--since`/`--until`: RFC 3339 (`2026-11-24T10:00:00Z`) or an age
/// (`10m`, `2h`, `1d` ago).
pub fn parse_time(s: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(now - d),
        Err(_) => Err(format!(
            "`{s}` is neither an RFC 3339 time (2026-11-24T10:00:00Z) nor an age (10m, 2h, 1d)"
        )),
    }
}

/// Parses `--dest HOST|CIDR[:PORT]`: `example.com`, `*.example.com:443`,
/// `10.0.0.0/8`, `127.0.0.2:8080`, `[::1]:443`, `::1`.
pub fn parse_dest(s: &str) -> Result<DestFilter, String> {
    let bad = || format!("`{s}` is not HOST, CIDR, HOST:PORT or CIDR:PORT");
    let net = |t: &str| -> Option<IpNet> {
        t.parse::<IpNet>()
            .ok()
            .or_else(|| t.parse::<IpAddr>().ok().map(IpNet::from))
    };
    if let Some(n) = net(s) {
        return Ok(DestFilter {
            target: DestTarget::Net(n),
            port: None,
        });
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (inner, port) = rest.split_once("]:").ok_or_else(bad)?;
        return Ok(DestFilter {
            target: DestTarget::Net(net(inner).ok_or_else(bad)?),
            port: Some(port.parse().map_err(|_| bad())?),
        });
    }
    if let Some((left, port)) = s.rsplit_once(':') {
        let port: u16 = port.parse().map_err(|_| bad())?;
        let target = match net(left) {
            Some(n) => DestTarget::Net(n),
            None if valid_host(left) => DestTarget::Host(left.to_ascii_lowercase()),
            None => return Err(bad()),
        };
        return Ok(DestFilter {
            target,
            port: Some(port),
        });
    }
    if valid_host(s) {
        return Ok(DestFilter {
            target: DestTarget::Host(s.to_ascii_lowercase()),
            port: None,
        });
    }
    Err(bad())
}

fn valid_host(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'*' | b'_'))
}

fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => host.ends_with(&format!(".{suffix}")),
        None => host == pattern,
    }
}

impl DestFilter {
    pub fn matches(&self, e: &Event) -> bool {
        let addr: Option<SocketAddr> = e.dst.as_deref().and_then(|d| d.parse().ok());
        if let Some(p) = self.port {
            if addr.map(|a| a.port()) != Some(p) {
                return false;
            }
        }
        match &self.target {
            DestTarget::Net(n) => addr.is_some_and(|a| n.contains(&a.ip())),
            DestTarget::Host(h) => e.host.as_deref().is_some_and(|eh| host_matches(h, eh)),
        }
    }
}

impl EventFilter {
    /// Whether an event passes every filter (the limit is applied by the query).
    pub fn matches(&self, e: &Event) -> bool {
        if self.since.is_some_and(|s| e.ts < s) || self.until.is_some_and(|u| e.ts > u) {
            return false;
        }
        if self.pid.is_some_and(|p| e.pid != Some(p)) {
            return false;
        }
        if let Some(u) = &self.user {
            let by_name = e.user.as_deref() == Some(u.as_str());
            let by_uid = u.parse::<u32>().ok().is_some_and(|id| e.uid == Some(id));
            if !by_name && !by_uid {
                return false;
            }
        }
        if let Some(x) = &self.exe {
            let Some(exe) = e.exe.as_deref() else {
                return false;
            };
            let base = exe.rsplit('/').next().unwrap_or(exe);
            if exe != x && base != x {
                return false;
            }
        }
        if self.dest.as_ref().is_some_and(|d| !d.matches(e)) {
            return false;
        }
        if self.verdict.is_some_and(|v| e.verdict != v) {
            return false;
        }
        if self.kind.is_some_and(|k| e.kind != k) {
            return false;
        }
        if self.id.is_some_and(|id| e.id != id) {
            return false;
        }
        if self.conn_id.is_some_and(|c| e.conn_id != Some(c)) {
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(dst: &str, host: Option<&str>) -> Event {
        let mut e = Event::connection(OffsetDateTime::now_utc());
        e.dst = Some(dst.into());
        e.host = host.map(Into::into);
        e
    }

    #[test]
    fn dest_forms() {
        assert_eq!(parse_dest("127.0.0.2:8080").unwrap().port, Some(8080));
        assert!(matches!(
            parse_dest("10.0.0.0/8").unwrap().target,
            DestTarget::Net(_)
        ));
        assert_eq!(parse_dest("[::1]:443").unwrap().port, Some(443));
        assert!(matches!(
            parse_dest("::1").unwrap().target,
            DestTarget::Net(_)
        ));
        assert!(matches!(
            parse_dest("*.example.com:443").unwrap().target,
            DestTarget::Host(_)
        ));
        assert!(parse_dest("exa mple").is_err());
        assert!(parse_dest("host:notaport").is_err());
    }

    #[test]
    fn dest_matching() {
        let e = ev("127.0.0.2:8080", Some("api.example.com"));
        assert!(parse_dest("127.0.0.0/8").unwrap().matches(&e));
        assert!(parse_dest("127.0.0.2:8080").unwrap().matches(&e));
        assert!(!parse_dest("127.0.0.2:8081").unwrap().matches(&e));
        assert!(parse_dest("*.example.com").unwrap().matches(&e));
        assert!(!parse_dest("example.org").unwrap().matches(&e));
        assert!(parse_dest("::1").unwrap().matches(&ev("[::1]:80", None)));
    }

    #[test]
    fn ages_and_times() {
        let now = OffsetDateTime::now_utc();
        assert_eq!(
            parse_time("10m", now).unwrap(),
            now - time::Duration::minutes(10)
        );
        assert!(parse_time("2026-11-24T10:00:00Z", now).is_ok());
        assert!(parse_time("yesterday", now).is_err());
    }

    #[test]
    fn id_and_connection_filters() {
        let mut e = ev("127.0.0.2:1", None);
        e.id = 7;
        e.conn_id = Some(99);
        let by = |id, conn_id| EventFilter {
            id,
            conn_id,
            ..Default::default()
        };
        assert!(by(Some(7), None).matches(&e));
        assert!(!by(Some(8), None).matches(&e));
        assert!(by(None, Some(99)).matches(&e));
        assert!(!by(None, Some(98)).matches(&e));
        // A filter from an older CLI (no id fields) still parses.
        let old: EventFilter = serde_json::from_str(
            r#"{"pid":null,"user":null,"exe":null,"dest":null,"verdict":null,"limit":null}"#,
        )
        .unwrap();
        assert!(old.id.is_none() && old.matches(&e));
    }

    #[test]
    fn user_and_exe_filters() {
        let mut e = ev("127.0.0.2:1", None);
        e.user = Some("alice".into());
        e.uid = Some(1000);
        e.exe = Some("/usr/bin/curl".into());
        let f = EventFilter {
            user: Some("1000".into()),
            exe: Some("curl".into()),
            ..Default::default()
        };
        assert!(f.matches(&e));
        let f = EventFilter {
            user: Some("bob".into()),
            ..Default::default()
        };
        assert!(!f.matches(&e));
    }
}
