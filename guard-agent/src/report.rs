//! The summary of a time window (a CI job): destinations, processes,
//! blocked and masked counts and findings per detector, as Markdown for a
//! job summary (`$GITHUB_STEP_SUMMARY`) or as JSON.
//!
//! Pure: events in, a [`Summary`] out, then text. It reads only what the
//! store holds (already masked), so the report can never show a secret.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use crate::store::{Event, EventKind, Verdict};

/// How many blocked events the report lists one by one.
pub const BLOCKED_LISTED: usize = 50;

/// One destination: a host name (when known) and an address.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DestinationRow {
    pub host: Option<String>,
    pub address: String,
    pub connections: u64,
    pub requests: u64,
    pub blocked: u64,
    pub masked: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
}

/// One process (by executable).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ProcessRow {
    pub exe: String,
    pub users: Vec<String>,
    pub connections: u64,
    pub requests: u64,
    pub blocked: u64,
    pub destinations: u64,
}

/// Findings of one detector.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DetectorRow {
    pub detector: String,
    pub findings: u64,
    /// Of those, masked in what left the host.
    pub masked: u64,
}

/// One blocked connection or request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BlockedRow {
    pub id: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
    pub exe: String,
    pub destination: String,
    pub what: String,
    pub rule: Option<String>,
    pub reason: Option<String>,
}

/// Everything `guard-agent report` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub until: Option<OffsetDateTime>,
    pub connections: u64,
    pub requests: u64,
    pub blocked: u64,
    pub masked: u64,
    /// Monitor mode: what enforce mode would have blocked.
    pub would_block: u64,
    pub errors: u64,
    pub destinations: Vec<DestinationRow>,
    pub processes: Vec<ProcessRow>,
    pub findings: Vec<DetectorRow>,
    /// The first [`BLOCKED_LISTED`] blocked events.
    pub blocked_events: Vec<BlockedRow>,
}

fn exe_of(e: &Event) -> String {
    e.exe
        .as_deref()
        .or(e.comm.as_deref())
        .unwrap_or("?")
        .to_owned()
}

fn host_of(e: &Event) -> Option<String> {
    e.http
        .as_ref()
        .map(|h| h.host.clone())
        .filter(|h| !h.is_empty())
        .or_else(|| e.host.clone())
        .or_else(|| e.tls.as_ref().and_then(|t| t.sni.clone()))
        .map(|h| {
            // Host headers may carry a port: the address column has it.
            match h.rsplit_once(':') {
                Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_owned(),
                _ => h,
            }
        })
}

impl Summary {
    /// Summarises `events` (any order) for the window `since..until`.
    pub fn build(
        events: &[Event],
        since: OffsetDateTime,
        until: Option<OffsetDateTime>,
    ) -> Summary {
        let mut s = Summary {
            since,
            until,
            connections: 0,
            requests: 0,
            blocked: 0,
            masked: 0,
            would_block: 0,
            errors: 0,
            destinations: Vec::new(),
            processes: Vec::new(),
            findings: Vec::new(),
            blocked_events: Vec::new(),
        };
        let mut dests: BTreeMap<(Option<String>, String), DestinationRow> = BTreeMap::new();
        let mut procs: BTreeMap<String, (ProcessRow, std::collections::BTreeSet<String>)> =
            BTreeMap::new();
        let mut dets: BTreeMap<String, DetectorRow> = BTreeMap::new();
        let mut sorted: Vec<&Event> = events.iter().collect();
        sorted.sort_by_key(|e| e.id);
        // A plaintext connection learns its host from its requests' Host.
        let mut conn_hosts: BTreeMap<u64, String> = BTreeMap::new();
        for e in &sorted {
            if let (EventKind::Http, Some(c), Some(h)) = (e.kind, e.conn_id, host_of(e)) {
                conn_hosts.entry(c).or_insert(h);
            }
        }
        for e in sorted {
            let is_conn = e.kind == EventKind::Connection;
            let address = e.dst.clone().unwrap_or_else(|| "?".into());
            let host = host_of(e).or_else(|| {
                e.conn_id
                    .filter(|_| is_conn)
                    .and_then(|c| conn_hosts.get(&c).cloned())
            });
            let d = dests
                .entry((host.clone(), address.clone()))
                .or_insert_with(|| DestinationRow {
                    host: host.clone(),
                    address: address.clone(),
                    ..Default::default()
                });
            let exe = exe_of(e);
            let (p, seen) = procs.entry(exe.clone()).or_insert_with(|| {
                (
                    ProcessRow {
                        exe: exe.clone(),
                        ..Default::default()
                    },
                    Default::default(),
                )
            });
            seen.insert(address.clone());
            if let Some(u) = e.user.clone().or_else(|| e.uid.map(|u| u.to_string())) {
                if !p.users.contains(&u) {
                    p.users.push(u);
                }
            }
            if is_conn {
                s.connections += 1;
                d.connections += 1;
                d.bytes_out += e.bytes_out;
                d.bytes_in += e.bytes_in;
                p.connections += 1;
            } else {
                s.requests += 1;
                d.requests += 1;
                p.requests += 1;
            }
            match e.verdict {
                Verdict::Block => {
                    s.blocked += 1;
                    d.blocked += 1;
                    p.blocked += 1;
                    if s.blocked_events.len() < BLOCKED_LISTED {
                        let what = match &e.http {
                            Some(h) => format!("{} {}{}", h.method, h.host, h.path),
                            None => "connection".to_owned(),
                        };
                        s.blocked_events.push(BlockedRow {
                            id: e.id,
                            ts: e.ts,
                            exe: exe.clone(),
                            destination: match &host {
                                Some(h) => format!("{h} ({address})"),
                                None => address.clone(),
                            },
                            what,
                            rule: e.policy.as_ref().map(|p| p.rule.clone()),
                            reason: e
                                .policy
                                .as_ref()
                                .and_then(|p| p.reason.clone())
                                .or_else(|| e.error.clone()),
                        });
                    }
                }
                Verdict::Mask => {
                    s.masked += 1;
                    d.masked += 1;
                }
                Verdict::Error => s.errors += 1,
                Verdict::Allow => {}
            }
            if e.policy
                .as_ref()
                .and_then(|p| p.would_have.as_deref())
                .is_some_and(|w| w == "block")
            {
                s.would_block += 1;
            }
            for f in &e.findings {
                let r = dets
                    .entry(f.detector.clone())
                    .or_insert_with(|| DetectorRow {
                        detector: f.detector.clone(),
                        ..Default::default()
                    });
                r.findings += 1;
                r.masked += u64::from(f.applied);
            }
        }
        s.destinations = dests.into_values().collect();
        s.destinations.sort_by(|a, b| {
            (b.blocked, b.connections + b.requests).cmp(&(a.blocked, a.connections + a.requests))
        });
        s.processes = procs
            .into_values()
            .map(|(mut p, seen)| {
                p.destinations = seen.len() as u64;
                p
            })
            .collect();
        s.processes.sort_by(|a, b| {
            (b.blocked, b.connections + b.requests).cmp(&(a.blocked, a.connections + a.requests))
        });
        s.findings = dets.into_values().collect();
        s.findings.sort_by_key(|f| std::cmp::Reverse(f.findings));
        s
    }

    /// Markdown for a CI job summary.
    pub fn markdown(&self) -> String {
        let t = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
        let mut m = String::new();
        let _ = writeln!(m, "## Guard: outbound traffic of this job\n");
        let _ = writeln!(
            m,
            "From {} to {}: **{} connections**, **{} HTTP requests**, **{} blocked**, {} masked, {} errors{}.\n",
            t(self.since),
            self.until.map(t).unwrap_or_else(|| "now".into()),
            self.connections,
            self.requests,
            self.blocked,
            self.masked,
            self.errors,
            if self.would_block > 0 {
                format!(", {} would have been blocked (monitor mode)", self.would_block)
            } else {
                String::new()
            }
        );
        if self.blocked > 0 {
            let _ = writeln!(m, "### Blocked\n");
            let _ = writeln!(m, "| time | process | destination | what | rule | reason |");
            let _ = writeln!(m, "|---|---|---|---|---|---|");
            for b in &self.blocked_events {
                let _ = writeln!(
                    m,
                    "| {} | `{}` | {} | {} | {} | {} |",
                    t(b.ts),
                    cell(&b.exe),
                    cell(&b.destination),
                    cell(&b.what),
                    cell(b.rule.as_deref().unwrap_or("-")),
                    cell(b.reason.as_deref().unwrap_or("-"))
                );
            }
            if self.blocked as usize > self.blocked_events.len() {
                let _ = writeln!(
                    m,
                    "\n… and {} more (`guard-agent events --verdict block`).",
                    self.blocked as usize - self.blocked_events.len()
                );
            }
            m.push('\n');
        }
        let _ = writeln!(m, "### Destinations\n");
        if self.destinations.is_empty() {
            let _ = writeln!(m, "No outbound connections were recorded.\n");
        } else {
            let _ = writeln!(
                m,
                "| host | address | connections | requests | blocked | masked | bytes out | bytes in |"
            );
            let _ = writeln!(m, "|---|---|---:|---:|---:|---:|---:|---:|");
            for d in &self.destinations {
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    cell(d.host.as_deref().unwrap_or("-")),
                    cell(&d.address),
                    d.connections,
                    d.requests,
                    d.blocked,
                    d.masked,
                    d.bytes_out,
                    d.bytes_in
                );
            }
            m.push('\n');
        }
        if !self.processes.is_empty() {
            let _ = writeln!(m, "### Processes\n");
            let _ = writeln!(
                m,
                "| process | users | connections | requests | blocked | destinations |"
            );
            let _ = writeln!(m, "|---|---|---:|---:|---:|---:|");
            for p in &self.processes {
                let _ = writeln!(
                    m,
                    "| `{}` | {} | {} | {} | {} | {} |",
                    cell(&p.exe),
                    cell(&p.users.join(", ")),
                    p.connections,
                    p.requests,
                    p.blocked,
                    p.destinations
                );
            }
            m.push('\n');
        }
        if !self.findings.is_empty() {
            let _ = writeln!(m, "### Findings\n");
            let _ = writeln!(m, "| detector | findings | masked |");
            let _ = writeln!(m, "|---|---:|---:|");
            for f in &self.findings {
                let _ = writeln!(
                    m,
                    "| {} | {} | {} |",
                    cell(&f.detector),
                    f.findings,
                    f.masked
                );
            }
            m.push('\n');
        }
        m
    }
}

/// Escapes text for one Markdown table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FindingRecord, HttpRecord, PolicyRecord};

    fn conn(id: u64, exe: &str, dst: &str, verdict: Verdict) -> Event {
        let mut e = Event::connection(OffsetDateTime::now_utc());
        e.id = id;
        e.exe = Some(exe.into());
        e.user = Some("runner".into());
        e.dst = Some(dst.into());
        e.verdict = verdict;
        e.bytes_out = 10;
        e.bytes_in = 100;
        e
    }

    #[test]
    fn counts_destinations_processes_blocks_and_findings() {
        let mut req = conn(3, "/usr/bin/python3", "127.0.0.3:8080", Verdict::Block);
        req.kind = EventKind::Http;
        req.http = Some(HttpRecord {
            method: "POST".into(),
            host: "evil.test:8080".into(),
            path: "/upload".into(),
            ..Default::default()
        });
        req.policy = Some(PolicyRecord {
            rule: "no-evil".into(),
            action: "block".into(),
            reason: Some("not on the allowlist".into()),
            ..Default::default()
        });
        let mut masked = conn(4, "/usr/bin/curl", "127.0.0.2:8080", Verdict::Mask);
        masked.kind = EventKind::Http;
        masked.findings = vec![FindingRecord {
            detector: "credit-card".into(),
            applied: true,
            ..Default::default()
        }];
        let events = vec![
            conn(1, "/usr/bin/curl", "127.0.0.2:8080", Verdict::Allow),
            conn(2, "/usr/bin/curl", "127.0.0.2:8080", Verdict::Allow),
            req,
            masked,
        ];
        let s = Summary::build(&events, OffsetDateTime::now_utc(), None);
        assert_eq!(
            (s.connections, s.requests, s.blocked, s.masked),
            (2, 2, 1, 1)
        );
        let first = &s.destinations[0];
        assert_eq!(first.host.as_deref(), Some("evil.test"));
        assert_eq!(first.blocked, 1);
        let curl = s
            .processes
            .iter()
            .find(|p| p.exe == "/usr/bin/curl")
            .unwrap();
        assert_eq!(
            (curl.connections, curl.requests, curl.destinations),
            (2, 1, 1)
        );
        assert_eq!(s.findings[0].detector, "credit-card");
        assert_eq!(s.findings[0].masked, 1);
        let md = s.markdown();
        assert!(md.contains("**1 blocked**"), "{md}");
        assert!(md.contains("| evil.test (127.0.0.3:8080) | POST evil.test:8080/upload | no-evil | not on the allowlist |"), "{md}");
        assert!(
            md.contains("| - | 127.0.0.2:8080 | 2 | 1 | 0 | 1 | 20 | 200 |"),
            "{md}"
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["blocked"], 1);
    }

    #[test]
    fn an_empty_window_says_so_and_cells_are_escaped() {
        let s = Summary::build(&[], OffsetDateTime::now_utc(), None);
        assert!(s
            .markdown()
            .contains("No outbound connections were recorded"));
        assert_eq!(cell("a|b\nc"), "a\\|b c");
    }
}
