//! `guard-agent events show ID`: one recorded event in full, for an
//! investigation. An HTTP event prints as `curl -v` would print the exchange
//! (`> ` request head, masked excerpt, `< ` response head, masked excerpt)
//! after a `* ` block saying who, when, where, how (TLS, timings) and what
//! the policy decided; a connection event prints its fields and the list of
//! its requests.
//!
//! It prints only what the store holds (credentials already fingerprinted,
//! excerpts already masked) and never reaches out to the process or the
//! destination. Control characters in recorded text are shown as `.` so a
//! recorded excerpt cannot drive the terminal.

use std::io::{self, Write};

use anyhow::bail;
use clap::Args;
use time::OffsetDateTime;

use super::{
    events::{for_each_event, Source},
    StateDirArg,
};
use crate::store::{Event, EventFilter, EventKind, HttpRecord};

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The event id (first column of `guard-agent events`).
    pub id: u64,
    /// Print the stored record as JSON instead.
    #[arg(long)]
    pub json: bool,
}

pub fn run(state: &StateDirArg, args: ShowArgs) -> anyhow::Result<()> {
    let filter = EventFilter {
        id: Some(args.id),
        ..Default::default()
    };
    let mut found = None;
    // Matched again here: an agent older than the id filter ignores it.
    let source = for_each_event(state, &filter, false, |e| {
        if filter.matches(&e) {
            found = Some(e);
        }
        Ok(())
    })?;
    let Some(event) = found else {
        bail!(
            "no event with id {} in {} ({}; `guard-agent events` lists the ids)",
            args.id,
            state.state_dir.display(),
            match source {
                Source::Agent => "asked the running agent",
                Source::Store => "read the store directly",
            }
        );
    };
    let stdout = io::stdout();
    let mut out = stdout.lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &event)?;
        writeln!(out)?;
        return Ok(());
    }
    let requests = match (event.kind, event.conn_id) {
        (EventKind::Connection, Some(conn)) => {
            let filter = EventFilter {
                conn_id: Some(conn),
                kind: Some(EventKind::Http),
                // Requests start after their connection was accepted.
                since: Some(event.ts - time::Duration::seconds(1)),
                ..Default::default()
            };
            let mut reqs = Vec::new();
            for_each_event(state, &filter, false, |e| {
                if filter.matches(&e) {
                    reqs.push(e);
                }
                Ok(())
            })?;
            reqs
        }
        _ => Vec::new(),
    };
    match render(&mut out, &event, &requests) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// Recorded text made safe for a terminal: control characters other than
/// newline and tab become `.`.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '.'
            } else {
                c
            }
        })
        .collect()
}

fn time_str(t: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

fn ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1} ms"))
        .unwrap_or_else(|| "-".into())
}

/// The standard reason phrase of a status code (`OK`, `Not Found`).
pub fn reason(status: u16) -> Option<&'static str> {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
}

/// `HTTP/1.1 200 OK`, with the reason phrase when the status has one.
pub fn status_line(version: &str, status: u16) -> String {
    match reason(status) {
        Some(reason) => format!("{version} {status} {reason}"),
        None => format!("{version} {status}"),
    }
}

/// The `* ` lines every event has: who, when, where, TLS, verdict.
fn write_context(out: &mut impl Write, e: &Event) -> io::Result<()> {
    let kind = match e.kind {
        EventKind::Http => "HTTP request",
        EventKind::Connection => "connection",
        EventKind::Dns => "DNS query",
        EventKind::Approval => "approval decision",
        EventKind::Grant => "grant",
        EventKind::PolicyReload => "policy reload",
    };
    writeln!(out, "* event {} · {kind}", e.id)?;
    writeln!(out, "* when: {}", time_str(e.ts))?;
    if let Some(c) = e.closed_at {
        writeln!(out, "* ended: {} ({})", time_str(c), ms(e.duration_ms))?;
    }
    let opt = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_else(|| "?".into());
    writeln!(
        out,
        "* process: pid {} (thread {}) {}",
        opt(e.pid),
        opt(e.tid),
        printable(e.exe.as_deref().or(e.comm.as_deref()).unwrap_or("?"))
    )?;
    if let Some(c) = &e.cmdline {
        writeln!(out, "* cmdline: {}", printable(c))?;
    }
    writeln!(
        out,
        "* user: {} (uid {}, gid {})",
        e.user.as_deref().unwrap_or("?"),
        opt(e.uid),
        opt(e.gid)
    )?;
    if !e.ancestors.is_empty() {
        let chain: Vec<String> = e
            .ancestors
            .iter()
            .map(|a| format!("{} {}", a.pid, printable(&a.exe)))
            .collect();
        writeln!(out, "* ancestors: {}", chain.join(" ← "))?;
    }
    if let Some(cg) = &e.cgroup {
        match &e.unit {
            Some(u) => writeln!(out, "* cgroup: {cg} (unit {u})")?,
            None => writeln!(out, "* cgroup: {cg}")?,
        }
    }
    writeln!(
        out,
        "* destination: {}{} from {}",
        e.dst.as_deref().unwrap_or("?"),
        e.host
            .as_deref()
            .map(|h| format!(" ({h})"))
            .unwrap_or_default(),
        e.src.as_deref().unwrap_or("?")
    )?;
    if let Some(c) = e.conn_id {
        writeln!(out, "* connection: {c:016x}")?;
    }
    if let Some(t) = &e.tls {
        if t.passthrough {
            writeln!(
                out,
                "* TLS: passthrough (not decrypted), SNI {}",
                t.sni.as_deref().unwrap_or("-")
            )?;
        } else {
            writeln!(
                out,
                "* TLS: client {} ALPN {}; upstream {} ALPN {}; SNI {}",
                t.version.as_deref().unwrap_or("?"),
                t.alpn.as_deref().unwrap_or("-"),
                t.upstream_version.as_deref().unwrap_or("?"),
                t.upstream_alpn.as_deref().unwrap_or("-"),
                t.sni.as_deref().unwrap_or("-")
            )?;
        }
    }
    write!(out, "* verdict: {}", e.verdict.as_str())?;
    if let Some(p) = &e.policy {
        write!(
            out,
            " · rule {} (action {}, {} mode",
            p.rule, p.action, p.mode
        )?;
        if let Some(w) = &p.would_have {
            write!(out, ", enforce would have: {w}")?;
        }
        write!(out, ")")?;
        if let Some(r) = &p.reason {
            write!(out, " · {}", printable(r))?;
        }
    }
    writeln!(out)?;
    for f in &e.findings {
        writeln!(
            out,
            "* finding: {} at {} → {} (fingerprint {}{}{})",
            f.detector,
            printable(&f.location),
            printable(&f.masked),
            f.fingerprint,
            if f.applied {
                ", masked"
            } else {
                ", not masked"
            },
            if f.goes_home {
                ", going to its own service"
            } else {
                ""
            }
        )?;
    }
    if let Some(err) = &e.error {
        writeln!(out, "* error: {}", printable(err))?;
    }
    Ok(())
}

fn write_body(out: &mut impl Write, dir: &str, excerpt: Option<&str>, size: u64) -> io::Result<()> {
    match excerpt {
        Some(x) if !x.is_empty() => {
            let text = printable(x);
            out.write_all(text.as_bytes())?;
            if !text.ends_with('\n') {
                writeln!(out)?;
            }
            let shown = x.len() as u64;
            if shown < size {
                writeln!(
                    out,
                    "* {dir} body: {size} bytes, the first {shown} shown (masked excerpt)"
                )?;
            } else {
                writeln!(out, "* {dir} body: {size} bytes (masked)")?;
            }
        }
        _ if size > 0 => writeln!(out, "* {dir} body: {size} bytes, no excerpt recorded")?,
        _ => {}
    }
    Ok(())
}

fn write_exchange(out: &mut impl Write, h: &HttpRecord) -> io::Result<()> {
    let target = match &h.query {
        Some(q) => format!("{}?{q}", h.path),
        None => h.path.clone(),
    };
    writeln!(out, "> {} {} {}", h.method, printable(&target), h.version)?;
    for (k, v) in &h.request_headers {
        writeln!(out, "> {k}: {}", printable(v))?;
    }
    writeln!(out, ">")?;
    write_body(
        out,
        "request",
        h.request_excerpt.as_deref(),
        h.request_bytes,
    )?;
    match h.status {
        Some(s) => {
            writeln!(out, "< {}", status_line(&h.version, s))?;
            for (k, v) in &h.response_headers {
                writeln!(out, "< {k}: {}", printable(v))?;
            }
            writeln!(out, "<")?;
            write_body(
                out,
                "response",
                h.response_excerpt.as_deref(),
                h.response_bytes,
            )?;
        }
        None => writeln!(out, "* no response")?,
    }
    if let Some(u) = &h.upgrade {
        write!(out, "* upgraded to {u}")?;
        if let Some(ms_) = h.upgrade_ms {
            write!(
                out,
                ": {:.1} ms, {} bytes out, {} bytes in after the handshake",
                ms_, h.upgrade_bytes_out, h.upgrade_bytes_in
            )?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// Prints one event; `requests` are a connection event's HTTP requests.
pub fn render(out: &mut impl Write, e: &Event, requests: &[Event]) -> io::Result<()> {
    write_context(out, e)?;
    match &e.http {
        Some(h) => {
            writeln!(
                out,
                "* timings: first byte {}, total {}",
                ms(h.ttfb_ms),
                ms(h.total_ms)
            )?;
            write_exchange(out, h)?;
        }
        None if e.dns.is_some() || e.admin.is_some() => {
            if let Some(d) = &e.dns {
                writeln!(
                    out,
                    "* query: {} {} over {} → {} (upstream {})",
                    printable(&d.qname),
                    d.qtype,
                    d.transport,
                    d.rcode.as_deref().unwrap_or("-"),
                    d.upstream.as_deref().unwrap_or("none")
                )?;
                for a in &d.answers {
                    writeln!(out, "*   answer: {}", printable(a))?;
                }
            }
            if let Some(a) = &e.admin {
                writeln!(
                    out,
                    "* action: {} by {} (uid {})",
                    a.action,
                    a.by_user.as_deref().unwrap_or("?"),
                    a.by_uid
                        .map(|u| u.to_string())
                        .unwrap_or_else(|| "?".into())
                )?;
                for (label, v) in [
                    ("hold", a.hold_id.map(|v| v.to_string())),
                    ("grant", a.grant_id.map(|v| v.to_string())),
                    ("scope", a.scope.clone()),
                    ("expires", a.expires.map(time_str)),
                    ("note", a.note.as_deref().map(printable)),
                    ("detail", a.detail.as_deref().map(printable)),
                ] {
                    if let Some(v) = v {
                        writeln!(out, "* {label}: {v}")?;
                    }
                }
            }
        }
        None => {
            writeln!(out, "* bytes: {} out, {} in", e.bytes_out, e.bytes_in)?;
            if e.kind == EventKind::Connection {
                if requests.is_empty() {
                    writeln!(out, "* requests: none recorded")?;
                } else {
                    writeln!(out, "* requests ({}):", requests.len())?;
                    for r in requests {
                        let Some(h) = &r.http else { continue };
                        writeln!(
                            out,
                            "*   {:>6}  {} {}{}{} → {} ({}, {})",
                            r.id,
                            h.method,
                            h.host,
                            printable(&h.path),
                            h.query
                                .as_deref()
                                .map(|q| format!("?{}", printable(q)))
                                .unwrap_or_default(),
                            h.status
                                .map(|s| s.to_string())
                                .unwrap_or_else(|| "-".into()),
                            r.verdict.as_str(),
                            ms(h.total_ms)
                        )?;
                    }
                }
            }
        }
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FindingRecord, PolicyRecord, TlsRecord, Verdict};

    fn post() -> Event {
        let mut e = Event::connection(OffsetDateTime::UNIX_EPOCH);
        e.id = 42;
        e.kind = EventKind::Http;
        e.pid = Some(1234);
        e.exe = Some("/usr/bin/curl".into());
        e.user = Some("root".into());
        e.uid = Some(0);
        e.dst = Some("127.0.0.2:443".into());
        e.host = Some("api.test".into());
        e.verdict = Verdict::Mask;
        e.tls = Some(TlsRecord {
            sni: Some("api.test".into()),
            alpn: Some("h2".into()),
            version: Some("TLSv1_3".into()),
            ..Default::default()
        });
        e.policy = Some(PolicyRecord {
            rule: "mask-cards".into(),
            action: "mask".into(),
            mode: "enforce".into(),
            ..Default::default()
        });
        e.findings = vec![FindingRecord {
            detector: "credit_card".into(),
            location: "body $.card".into(),
            masked: "4111********1111".into(),
            fingerprint: "fp:ab12".into(),
            applied: true,
            ..Default::default()
        }];
        e.http = Some(HttpRecord {
            method: "POST".into(),
            scheme: "https".into(),
            host: "api.test".into(),
            path: "/v1/pay".into(),
            query: Some("x=1".into()),
            version: "HTTP/1.1".into(),
            status: Some(200),
            request_headers: vec![
                ("authorization".into(), "fp:1f2e3d".into()),
                ("content-type".into(), "application/json".into()),
            ],
            response_headers: vec![("content-length".into(), "2".into())],
            request_bytes: 30,
            response_bytes: 2,
            request_excerpt: Some("{\"card\":\"4111********1111\"}\u{1b}[2J".into()),
            response_excerpt: Some("ok".into()),
            ..Default::default()
        });
        e
    }

    #[test]
    fn an_http_event_prints_like_curl_verbose() {
        let mut out = Vec::new();
        render(&mut out, &post(), &[]).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("> POST /v1/pay?x=1 HTTP/1.1\n"), "{text}");
        assert!(text.contains("> authorization: fp:1f2e3d\n"), "{text}");
        assert!(text.contains("< HTTP/1.1 200 OK\n"), "{text}");
        assert!(text.contains("< content-length: 2\n"), "{text}");
        assert!(text.contains("* process: pid 1234"), "{text}");
        assert!(text.contains("rule mask-cards"), "{text}");
        assert!(text.contains("credit_card at body $.card"), "{text}");
        assert!(text.contains("ALPN h2"), "{text}");
        // An escape sequence in an excerpt cannot reach the terminal.
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(text.contains(".[2J"), "{text}");
    }

    #[test]
    fn a_connection_lists_its_requests() {
        let mut c = Event::connection(OffsetDateTime::UNIX_EPOCH);
        c.id = 7;
        c.conn_id = Some(99);
        c.bytes_out = 10;
        let mut r = post();
        r.conn_id = Some(99);
        let mut out = Vec::new();
        render(&mut out, &c, &[r]).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("* event 7 · connection"), "{text}");
        assert!(text.contains("* requests (1):"), "{text}");
        assert!(text.contains("POST api.test/v1/pay?x=1 → 200"), "{text}");
    }

    #[test]
    fn status_lines_have_reasons_when_known() {
        assert_eq!(status_line("HTTP/2", 404), "HTTP/2 404 Not Found");
        assert_eq!(status_line("HTTP/1.1", 599), "HTTP/1.1 599");
    }
}
