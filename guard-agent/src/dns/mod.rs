//! The agent's resolver: DNS of monitored processes, redirected by the
//! kernel programs (UDP port 53 by `sendmsg`/`connect`, TCP port 53 by the
//! TCP redirect), is answered here.
//!
//! Per query: who asked (the kernel's record, by the query's source
//! address), policy on the name (a blocked name gets NXDOMAIN or REFUSED),
//! tunnelling heuristics (findings on the event), forwarding to the host's
//! resolvers, learning IP → name from the answer, one `dns` event.
//!
//! Files: `settings.rs` (configuration), `upstream.rs` (resolv.conf and
//! forwarding), `names.rs` (the IP → names map), `tunnel.rs` (heuristics).
//!
//! Invariants: the resolver listens on loopback only; it never answers a
//! query it cannot attribute to a redirected process (REFUSED), so it is not
//! an open resolver for the host; query names are masked before they are
//! recorded; it forwards only to the configured upstreams, never to the
//! address the client asked (that is what the configuration replaces).

pub mod names;
pub mod settings;
pub mod tunnel;
pub mod upstream;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use guard_common::OriginalDst;
use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{RData, RecordType},
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpStream, UdpSocket},
    sync::watch,
};

pub use names::NameMap;
use settings::{BlockAnswer, DnsSettings};
use tunnel::{RateTracker, TunnelSign};

use crate::{
    bpf::udp::DnsPeerTable,
    http::inspect::Inspector,
    intercept::listener::{attribute, original_addr},
    policy::{FindingFact, PolicyStore, Protocol, RequestFacts, Verdict as PolicyVerdict},
    proc::ProcCache,
    store::{DnsRecord, Event, EventKind, EventSink, FindingRecord, PolicyRecord, Verdict},
};

/// Why a `RequireApproval` rule for `protocol: [Dns]` refuses the name.
pub const DNS_CANNOT_WAIT: &str =
    "a DNS query cannot be held for approval (clients time out); refused";

/// The largest datagram read from a client.
const MAX_QUERY: usize = 4096;

/// Health and counters, for `guard-agent status`.
#[derive(Debug, Default)]
pub struct ResolverHealth {
    pub up: AtomicBool,
    pub listen: Mutex<Vec<String>>,
    pub upstream: Mutex<Vec<String>>,
    pub queries: AtomicU64,
    pub blocked: AtomicU64,
    pub flagged: AtomicU64,
    pub failed: AtomicU64,
}

/// `status`'s view of the resolver (additive field of the status reply).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResolverStatus {
    pub up: bool,
    pub listen: Vec<String>,
    pub upstream: Vec<String>,
    pub queries: u64,
    pub blocked: u64,
    pub flagged: u64,
    pub failed: u64,
}

impl ResolverHealth {
    pub fn snapshot(&self) -> ResolverStatus {
        let lock = |m: &Mutex<Vec<String>>| m.lock().unwrap_or_else(|p| p.into_inner()).clone();
        ResolverStatus {
            up: self.up.load(Ordering::Relaxed),
            listen: lock(&self.listen),
            upstream: lock(&self.upstream),
            queries: self.queries.load(Ordering::Relaxed),
            blocked: self.blocked.load(Ordering::Relaxed),
            flagged: self.flagged.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// Everything a query needs.
pub struct Resolver {
    pub settings: DnsSettings,
    pub upstreams: Vec<SocketAddr>,
    pub mark: u32,
    pub names: Arc<NameMap>,
    pub peers: DnsPeerTable,
    pub procs: Arc<ProcCache>,
    pub sink: EventSink,
    pub policy: Arc<PolicyStore>,
    pub inspector: Arc<Inspector>,
    pub health: Arc<ResolverHealth>,
    pub rates: RateTracker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// A response to `query` with only a response code (question kept, so that
/// stub resolvers accept it).
fn rcode_only(query: &Message, rcode: ResponseCode) -> Option<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(rcode);
    m.add_queries(query.queries().to_vec());
    m.to_vec().ok()
}

/// A FORMERR for bytes that are not a DNS message but carry an id.
fn formerr(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([raw[0], raw[1]]);
    Message::error_msg(id, hickory_proto::op::OpCode::Query, ResponseCode::FormErr)
        .to_vec()
        .ok()
}

/// Answer records in words, and (address, TTL) pairs to learn from.
fn describe_answers(answer: &Message) -> (Vec<String>, Vec<(std::net::IpAddr, u32)>) {
    let mut words = Vec::new();
    let mut addrs = Vec::new();
    for r in answer.answers() {
        let data = r.data();
        match data {
            RData::A(a) => addrs.push((std::net::IpAddr::V4(a.0), r.ttl())),
            RData::AAAA(a) => addrs.push((std::net::IpAddr::V6(a.0), r.ttl())),
            _ => {}
        }
        words.push(format!("{} {}", r.record_type(), data));
    }
    (words, addrs)
}

impl Resolver {
    /// Serves DNS over UDP on `sock` until `stop` turns true.
    pub async fn serve_udp(self: Arc<Self>, sock: UdpSocket, mut stop: watch::Receiver<bool>) {
        let sock = Arc::new(sock);
        let mut buf = vec![0u8; MAX_QUERY];
        loop {
            tokio::select! {
                r = sock.recv_from(&mut buf) => match r {
                    Ok((n, peer)) => {
                        let query = buf[..n].to_vec();
                        let me = Arc::clone(&self);
                        let sock = Arc::clone(&sock);
                        tokio::spawn(async move {
                            let who = me.who_sent(peer).await;
                            if let Some(answer) = me.answer(&query, who, peer, Transport::Udp).await {
                                if let Err(e) = sock.send_to(&answer, peer).await {
                                    tracing::debug!("DNS answer to {peer} not sent: {e}");
                                }
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!("DNS receive failed: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
                _ = stop.changed() => break,
            }
        }
        self.health.up.store(false, Ordering::Relaxed);
    }

    /// The kernel's record of who sent a query from `peer`; it is published
    /// as the datagram leaves, a few retries cover scheduling delays.
    async fn who_sent(&self, peer: SocketAddr) -> Option<OriginalDst> {
        for attempt in 0..3 {
            if let Some(o) = self.peers.take(peer) {
                return Some(o);
            }
            tokio::time::sleep(Duration::from_millis(1 << attempt)).await;
        }
        None
    }

    /// Serves a redirected DNS-over-TCP connection: length-prefixed queries,
    /// each answered through the upstreams over TCP.
    pub async fn serve_tcp(
        &self,
        mut client: TcpStream,
        orig: OriginalDst,
        peer: SocketAddr,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let query = tokio::select! {
                q = tokio::time::timeout(Duration::from_secs(30), upstream::read_framed(&mut client)) => match q {
                    Ok(Ok(q)) => q,
                    _ => break,
                },
                _ = crate::shutdown::stopped(&mut stop) => break,
            };
            let Some(answer) = self.answer(&query, Some(orig), peer, Transport::Tcp).await else {
                break;
            };
            let Ok(len) = u16::try_from(answer.len()) else {
                break;
            };
            let mut framed = len.to_be_bytes().to_vec();
            framed.extend_from_slice(&answer);
            if client.write_all(&framed).await.is_err() {
                break;
            }
        }
    }

    /// Answers one query and records it. `None`: nothing to send back.
    async fn answer(
        &self,
        raw: &[u8],
        who: Option<OriginalDst>,
        peer: SocketAddr,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        self.health.queries.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let mut ev = Event::connection(OffsetDateTime::now_utc());
        ev.kind = EventKind::Dns;
        ev.src = Some(peer.to_string());
        let mut rec = DnsRecord {
            transport: transport.as_str().into(),
            ..Default::default()
        };

        let query = match Message::from_vec(raw) {
            Ok(m) if m.message_type() == MessageType::Query && !m.queries().is_empty() => m,
            Ok(m) => {
                ev.verdict = Verdict::Error;
                ev.error = Some("not a DNS query with a question".into());
                self.finish(ev, rec, started).await;
                return rcode_only(&m, ResponseCode::FormErr);
            }
            Err(e) => {
                ev.verdict = Verdict::Error;
                ev.error = Some(format!("malformed DNS query: {e}"));
                self.finish(ev, rec, started).await;
                return formerr(raw);
            }
        };
        let q = &query.queries()[0];
        let qname_raw = q.name().to_ascii();
        let qname = qname_raw.trim_end_matches('.').to_ascii_lowercase();
        let qtype = q.query_type();
        rec.qname = self.masked(&qname);
        rec.qtype = qtype.to_string();
        ev.host = Some(rec.qname.clone());

        let Some(orig) = who else {
            // Not sent by a monitored process through the redirect: the
            // resolver is not a service for the rest of the host.
            ev.verdict = Verdict::Error;
            ev.error = Some(
                "query not redirected by Guard's kernel programs (no attribution): refused".into(),
            );
            rec.rcode = Some(ResponseCode::Refused.to_string());
            self.finish(ev, rec, started).await;
            return rcode_only(&query, ResponseCode::Refused);
        };
        let resolver_asked = original_addr(&orig);
        ev.dst = Some(resolver_asked.to_string());
        let info = self.procs.lookup(orig.tgid).await;
        attribute(&mut ev, &orig, &info, &self.procs, &self.inspector);

        // Tunnelling signs become findings.
        let now = Instant::now();
        let limits = &self.settings.tunnel;
        let mut signs: Vec<TunnelSign> = tunnel::long_label(&qname, limits).into_iter().collect();
        signs.extend(
            self.rates
                .observe(&qname, qtype == RecordType::TXT, limits, now),
        );
        for s in &signs {
            ev.findings.push(FindingRecord {
                detector: tunnel::DETECTOR.into(),
                location: s.location(),
                masked: s.summary(),
                fingerprint: String::new(),
                goes_home: false,
                applied: false,
            });
        }
        if !signs.is_empty() {
            self.health.flagged.fetch_add(1, Ordering::Relaxed);
        }

        let facts = RequestFacts {
            exe: ev.exe.clone(),
            comm: ev.comm.clone(),
            ancestors: ev.ancestors.iter().map(|a| a.exe.clone()).collect(),
            user: ev.user.clone(),
            uid: ev.uid,
            cgroup: ev.cgroup.clone(),
            systemd_unit: ev.unit.clone(),
            dest_host: Some(qname.clone()),
            dest_ip: Some(resolver_asked.ip()),
            dest_port: Some(resolver_asked.port()),
            protocol: Some(Protocol::Dns),
            findings: if signs.is_empty() {
                Vec::new()
            } else {
                vec![FindingFact::new(tunnel::DETECTOR, false)]
            },
            ..Default::default()
        };
        let decision = self.policy.current().decide_dns(&facts);
        let record = |action: &str| PolicyRecord {
            rule: decision.rule.to_string(),
            action: action.into(),
            mode: format!("{:?}", decision.mode).to_lowercase(),
            would_have: decision.would_have.as_ref().map(|v| v.kind().to_owned()),
            reason: Some(decision.reason.to_string()),
        };
        let blocked_reason = match &decision.action {
            PolicyVerdict::Block { reason } => Some(reason.to_string()),
            // A stub resolver gives up within seconds: a DNS query cannot
            // wait for a human, so a hold on a name refuses it (hold the
            // connection that follows instead).
            PolicyVerdict::RequireApproval { .. } => Some(DNS_CANNOT_WAIT.to_owned()),
            PolicyVerdict::AuditOnly => {
                ev.policy = Some(record("audit_only"));
                None
            }
            _ => None,
        };
        if let Some(reason) = blocked_reason {
            self.health.blocked.fetch_add(1, Ordering::Relaxed);
            let rcode = match self.settings.block_answer {
                BlockAnswer::NxDomain => ResponseCode::NXDomain,
                BlockAnswer::Refused => ResponseCode::Refused,
            };
            ev.verdict = Verdict::Block;
            let mut p = record("block");
            p.reason = Some(reason);
            ev.policy = Some(p);
            rec.rcode = Some(rcode.to_string());
            self.finish(ev, rec, started).await;
            return rcode_only(&query, rcode);
        }

        let forwarded = match transport {
            Transport::Udp => {
                upstream::forward_udp(
                    raw,
                    &self.upstreams,
                    self.mark,
                    self.settings.upstream_timeout,
                )
                .await
            }
            Transport::Tcp => {
                upstream::forward_tcp(
                    raw,
                    &self.upstreams,
                    self.mark,
                    self.settings.upstream_timeout,
                )
                .await
            }
        };
        let (answer, from) = match forwarded {
            Ok(a) => a,
            Err(e) => {
                self.health.failed.fetch_add(1, Ordering::Relaxed);
                ev.verdict = Verdict::Error;
                ev.error = Some(e.to_string());
                rec.rcode = Some(ResponseCode::ServFail.to_string());
                self.finish(ev, rec, started).await;
                return rcode_only(&query, ResponseCode::ServFail);
            }
        };
        rec.upstream = Some(from.to_string());
        match Message::from_vec(&answer) {
            Ok(m) => {
                rec.rcode = Some(m.response_code().to_string());
                let (words, addrs) = describe_answers(&m);
                rec.answers = words.iter().map(|w| self.masked(w)).collect();
                for (ip, ttl) in addrs {
                    self.names
                        .insert(ip, &qname, Duration::from_secs(u64::from(ttl)), now);
                }
            }
            Err(e) => ev.error = Some(format!("upstream answer not understood: {e}")),
        }
        ev.bytes_out = raw.len() as u64;
        ev.bytes_in = answer.len() as u64;
        self.finish(ev, rec, started).await;
        Some(answer)
    }

    fn masked(&self, text: &str) -> String {
        self.inspector
            .mask_for_record(text.as_bytes())
            .map(|m| String::from_utf8_lossy(&m).into_owned())
            .unwrap_or_else(|| text.to_owned())
    }

    async fn finish(&self, mut ev: Event, rec: DnsRecord, started: Instant) {
        let elapsed = started.elapsed();
        ev.closed_at = Some(ev.ts + elapsed);
        ev.duration_ms = Some(elapsed.as_secs_f64() * 1000.0);
        ev.dns = Some(rec);
        self.sink.record(ev).await;
    }
}

/// Binds the resolver's UDP sockets; the error names the address.
pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<UdpSocket>, (SocketAddr, std::io::Error)> {
    let mut out = Vec::new();
    for a in addrs {
        out.push(UdpSocket::bind(a).await.map_err(|e| (*a, e))?);
    }
    Ok(out)
}

/// The upstreams to forward to: the configured ones, else resolv.conf's;
/// never the resolver itself.
pub fn upstreams(settings: &DnsSettings, own: &[SocketAddr]) -> Vec<SocketAddr> {
    let list = if settings.upstream.is_empty() {
        upstream::system_resolvers(std::path::Path::new("/etc/resolv.conf"))
    } else {
        settings.upstream.clone()
    };
    list.into_iter().filter(|u| !own.contains(u)).collect()
}

/// Where the resolver listens: `dns.listen`, else the address and port of
/// each TCP listener (UDP and TCP ports are separate spaces); none when DNS
/// is turned off.
pub fn listen_addrs(cfg: &crate::config::AgentConfig) -> Vec<SocketAddr> {
    if !cfg.dns.enabled {
        return Vec::new();
    }
    if !cfg.dns.listen.is_empty() {
        return cfg.dns.listen.clone();
    }
    cfg.listen_v4.into_iter().chain(cfg.listen_v6).collect()
}
