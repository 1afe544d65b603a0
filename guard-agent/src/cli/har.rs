//! HAR 1.2 (HTTP Archive) from recorded HTTP events, for
//! `guard-agent events export --format har`: a file a browser's devtools
//! (Network → Import HAR) and HAR viewers open.
//!
//! The mapping uses only what the store holds: header values as recorded
//! (credentials fingerprinted), body texts are the masked excerpts, sizes
//! are the real body sizes. Guard's own facts (event id, process, verdict,
//! rule, findings) go in `_guard`, a custom field as HAR 1.2 allows
//! (leading underscore). It must never add content the store does not have.

use std::net::SocketAddr;

use serde::Serialize;
use time::{macros::format_description, OffsetDateTime, UtcOffset};

use super::events_show::reason;
use crate::store::{Event, FindingRecord, HttpRecord, PolicyRecord};

#[derive(Debug, Serialize)]
pub struct Har {
    pub log: Log,
}

#[derive(Debug, Serialize)]
pub struct Log {
    pub version: &'static str,
    pub creator: Creator,
    pub entries: Vec<Entry>,
}

#[derive(Debug, Serialize)]
pub struct Creator {
    pub name: &'static str,
    pub version: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub started_date_time: String,
    /// Total time in ms: the sum of `timings`.
    pub time: f64,
    pub request: HarRequest,
    pub response: HarResponse,
    pub cache: Empty,
    pub timings: Timings,
    #[serde(rename = "serverIPAddress", skip_serializing_if = "Option::is_none")]
    pub server_ip_address: Option<String>,
    /// The connection id (hex), shared by the requests of one connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection: Option<String>,
    #[serde(rename = "_guard")]
    pub guard: GuardFacts,
}

#[derive(Debug, Serialize)]
pub struct Empty {}

#[derive(Debug, Serialize, PartialEq)]
pub struct NameValue {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HarRequest {
    pub method: String,
    pub url: String,
    pub http_version: String,
    pub cookies: Vec<NameValue>,
    pub headers: Vec<NameValue>,
    pub query_string: Vec<NameValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub post_data: Option<PostData>,
    pub headers_size: i64,
    pub body_size: i64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PostData {
    pub mime_type: String,
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HarResponse {
    pub status: u16,
    pub status_text: String,
    pub http_version: String,
    pub cookies: Vec<NameValue>,
    pub headers: Vec<NameValue>,
    pub content: Content,
    #[serde(rename = "redirectURL")]
    pub redirect_url: String,
    pub headers_size: i64,
    pub body_size: i64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Content {
    pub size: u64,
    pub mime_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// HAR timings in ms; -1 means "does not apply / not measured".
#[derive(Debug, Serialize)]
pub struct Timings {
    pub blocked: f64,
    pub dns: f64,
    pub connect: f64,
    pub send: f64,
    pub wait: f64,
    pub receive: f64,
    pub ssl: f64,
}

/// Guard's own facts about the request (a HAR custom field).
#[derive(Debug, Serialize)]
pub struct GuardFacts {
    pub event_id: u64,
    pub pid: Option<u32>,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub user: Option<String>,
    pub uid: Option<u32>,
    pub verdict: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyRecord>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<FindingRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<String>,
}

impl Har {
    /// A HAR log of the HTTP events among `events` (others are skipped).
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a Event>) -> Self {
        Har {
            log: Log {
                version: "1.2",
                creator: Creator {
                    name: "guard-agent",
                    version: env!("CARGO_PKG_VERSION"),
                },
                entries: events.into_iter().filter_map(entry).collect(),
            },
        }
    }
}

fn pairs(list: &[(String, String)]) -> Vec<NameValue> {
    list.iter()
        .map(|(k, v)| NameValue {
            name: k.clone(),
            value: v.clone(),
        })
        .collect()
}

fn header<'a>(list: &'a [(String, String)], name: &str) -> Option<&'a str> {
    list.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// `scheme://host[:port]/path[?query]`; the port only when it is not the
/// scheme's default. A CONNECT: `scheme://host:port` of its target.
pub fn url_of(h: &HttpRecord, dst: Option<&str>) -> String {
    if h.method == "CONNECT" {
        // The path is the tunnel's target, `host:port`.
        return format!("{}://{}", h.scheme, h.path);
    }
    let port = dst
        .and_then(|d| d.parse::<SocketAddr>().ok())
        .map(|a| a.port());
    let default = if h.scheme == "https" { 443 } else { 80 };
    let host = if h.host.contains(':') {
        format!("[{}]", h.host)
    } else {
        h.host.clone()
    };
    let port = match port {
        Some(p) if p != default => format!(":{p}"),
        _ => String::new(),
    };
    let query = h
        .query
        .as_deref()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    format!("{}://{host}{port}{}{query}", h.scheme, h.path)
}

/// `a=1&b&c=3` as name/value pairs, as recorded (not decoded).
fn query_pairs(q: Option<&str>) -> Vec<NameValue> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (n, v) = p.split_once('=').unwrap_or((p, ""));
            NameValue {
                name: n.to_owned(),
                value: v.to_owned(),
            }
        })
        .collect()
}

fn excerpt_comment(excerpt: &str, size: u64) -> Option<String> {
    let shown = excerpt.len() as u64;
    (shown < size)
        .then(|| format!("masked excerpt recorded by Guard: the first {shown} of {size} bytes"))
}

/// ISO 8601 in UTC with milliseconds (`2026-11-24T10:00:00.123Z`), the form
/// browsers' HAR importers parse.
fn started(ts: OffsetDateTime) -> String {
    ts.to_offset(UtcOffset::UTC)
        .format(format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        ))
        .unwrap_or_default()
}

fn entry(e: &Event) -> Option<Entry> {
    let h = e.http.as_ref()?;
    let wait = h.ttfb_ms.unwrap_or(0.0).max(0.0);
    let total = h.total_ms.unwrap_or(wait).max(wait);
    let receive = total - wait;
    let post_data = h.request_excerpt.as_ref().map(|text| PostData {
        mime_type: header(&h.request_headers, "content-type")
            .unwrap_or("")
            .to_owned(),
        text: text.clone(),
        comment: excerpt_comment(text, h.request_bytes),
    });
    let (status, status_text) = match h.status {
        Some(s) => (s, reason(s).unwrap_or("").to_owned()),
        None => (0, String::new()),
    };
    let server_ip = e
        .dst
        .as_deref()
        .and_then(|d| d.parse::<SocketAddr>().ok())
        .map(|a| a.ip().to_string());
    Some(Entry {
        started_date_time: started(e.ts),
        time: total,
        request: HarRequest {
            method: h.method.clone(),
            url: url_of(h, e.dst.as_deref()),
            http_version: h.version.clone(),
            cookies: Vec::new(),
            headers: pairs(&h.request_headers),
            query_string: query_pairs(h.query.as_deref()),
            post_data,
            headers_size: -1,
            body_size: h.request_bytes as i64,
        },
        response: HarResponse {
            status,
            status_text,
            http_version: h.version.clone(),
            cookies: Vec::new(),
            headers: pairs(&h.response_headers),
            content: Content {
                size: h.response_bytes,
                mime_type: header(&h.response_headers, "content-type")
                    .unwrap_or("")
                    .to_owned(),
                comment: h
                    .response_excerpt
                    .as_deref()
                    .and_then(|x| excerpt_comment(x, h.response_bytes)),
                text: h.response_excerpt.clone(),
            },
            redirect_url: header(&h.response_headers, "location")
                .unwrap_or("")
                .to_owned(),
            headers_size: -1,
            body_size: if h.status.is_some() {
                h.response_bytes as i64
            } else {
                -1
            },
        },
        cache: Empty {},
        timings: Timings {
            blocked: -1.0,
            dns: -1.0,
            connect: -1.0,
            send: 0.0,
            wait,
            receive,
            ssl: -1.0,
        },
        server_ip_address: server_ip,
        connection: e.conn_id.map(|c| format!("{c:016x}")),
        guard: GuardFacts {
            event_id: e.id,
            pid: e.pid,
            exe: e.exe.clone(),
            cmdline: e.cmdline.clone(),
            user: e.user.clone(),
            uid: e.uid,
            verdict: e.verdict.as_str(),
            policy: e.policy.clone(),
            findings: e.findings.clone(),
            error: e.error.clone(),
            upgrade: h.upgrade.clone(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EventKind, Verdict};

    fn request(scheme: &str, dst: &str, status: Option<u16>) -> Event {
        let mut e = Event::connection(OffsetDateTime::UNIX_EPOCH);
        e.id = 5;
        e.kind = EventKind::Http;
        e.dst = Some(dst.into());
        e.conn_id = Some(0xabc);
        e.verdict = Verdict::Mask;
        e.http = Some(HttpRecord {
            method: "POST".into(),
            scheme: scheme.into(),
            host: "api.test".into(),
            path: "/v1/items".into(),
            query: Some("page=2&token=****&flag".into()),
            version: "HTTP/1.1".into(),
            status,
            request_headers: vec![
                ("Content-Type".into(), "application/json".into()),
                ("authorization".into(), "fp:1234".into()),
            ],
            response_headers: vec![("content-type".into(), "text/plain".into())],
            request_bytes: 10_000,
            response_bytes: 2,
            ttfb_ms: Some(3.0),
            total_ms: Some(5.5),
            request_excerpt: Some("{\"card\":\"****\"}".into()),
            response_excerpt: Some("ok".into()),
            ..Default::default()
        });
        e
    }

    #[test]
    fn an_http_event_maps_to_a_har_entry() {
        let har = Har::from_events(&[request("https", "127.0.0.2:8443", Some(201))]);
        let v = serde_json::to_value(&har).unwrap();
        assert_eq!(v["log"]["version"], "1.2");
        assert_eq!(v["log"]["creator"]["name"], "guard-agent");
        let e = &v["log"]["entries"][0];
        assert_eq!(e["startedDateTime"], "1970-01-01T00:00:00.000Z");
        assert_eq!(e["time"], 5.5);
        assert_eq!(e["timings"]["wait"], 3.0);
        assert_eq!(e["timings"]["receive"], 2.5);
        assert_eq!(e["timings"]["send"], 0.0);
        assert_eq!(e["serverIPAddress"], "127.0.0.2");
        assert_eq!(e["connection"], "0000000000000abc");
        let r = &e["request"];
        assert_eq!(r["method"], "POST");
        assert_eq!(
            r["url"],
            "https://api.test:8443/v1/items?page=2&token=****&flag"
        );
        assert_eq!(r["httpVersion"], "HTTP/1.1");
        assert_eq!(r["headers"][1]["name"], "authorization");
        assert_eq!(r["headers"][1]["value"], "fp:1234");
        assert_eq!(r["queryString"][1]["name"], "token");
        assert_eq!(r["queryString"][1]["value"], "****");
        assert_eq!(r["queryString"][2]["name"], "flag");
        assert_eq!(r["postData"]["mimeType"], "application/json");
        assert_eq!(r["postData"]["text"], "{\"card\":\"****\"}");
        assert!(r["postData"]["comment"]
            .as_str()
            .unwrap()
            .contains("of 10000 bytes"));
        assert_eq!(r["bodySize"], 10_000);
        let s = &e["response"];
        assert_eq!(s["status"], 201);
        assert_eq!(s["statusText"], "Created");
        assert_eq!(s["content"]["size"], 2);
        assert_eq!(s["content"]["mimeType"], "text/plain");
        assert_eq!(s["content"]["text"], "ok");
        assert!(s["content"]["comment"].is_null());
        assert_eq!(s["redirectURL"], "");
        assert_eq!(e["_guard"]["event_id"], 5);
        assert_eq!(e["_guard"]["verdict"], "mask");
    }

    #[test]
    fn default_ports_are_left_out_and_connections_skipped() {
        let plain = request("http", "127.0.0.2:80", Some(200));
        let tls = request("https", "[::1]:443", None);
        let conn = Event::connection(OffsetDateTime::UNIX_EPOCH);
        let har = Har::from_events(&[plain, tls, conn]);
        let v = serde_json::to_value(&har).unwrap();
        let entries = v["log"]["entries"].as_array().unwrap();
        assert_eq!(entries.len(), 2, "the connection event is not an entry");
        assert!(entries[0]["request"]["url"]
            .as_str()
            .unwrap()
            .starts_with("http://api.test/v1/items?"));
        assert!(entries[1]["request"]["url"]
            .as_str()
            .unwrap()
            .starts_with("https://api.test/v1/items?"));
        // No response: status 0, as browsers write failed requests.
        assert_eq!(entries[1]["response"]["status"], 0);
        assert_eq!(entries[1]["response"]["bodySize"], -1);
        assert_eq!(entries[1]["serverIPAddress"], "::1");
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        let mut h = request("https", "[::1]:8443", Some(200)).http.unwrap();
        h.host = "::1".into();
        h.query = None;
        assert_eq!(
            url_of(&h, Some("[::1]:8443")),
            "https://[::1]:8443/v1/items"
        );
    }

    #[test]
    fn a_connect_is_its_target() {
        let mut h = request("http", "127.0.0.2:3128", Some(200)).http.unwrap();
        h.method = "CONNECT".into();
        h.host = "api.test".into();
        h.path = "api.test:8443".into();
        h.query = None;
        assert_eq!(url_of(&h, Some("127.0.0.2:3128")), "http://api.test:8443");
    }
}
