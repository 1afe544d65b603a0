//! Accepting redirected connections and handling each one: original
//! destination, attribution, upstream connect, splice, event.

use std::{
    net::{Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use guard_common::OriginalDst;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::{net::TcpStream, sync::watch};

use globset::GlobSet;

use super::{
    connect::{connect_tcp, describe_connect_error},
    sniff::{peek_classify, ClientHelloInfo, Sniff, MAX_SNIFF_BYTES},
    splice::{splice, ByteCounts, CountingIo},
};
use crate::{
    bpf::OriginalDstTable,
    proc::{ProcCache, ProcInfo},
    store::{Event, EventSink, Verdict},
};
use crate::{
    http::{
        inspect::Inspector,
        pipeline::{self, ConnContext},
        upstream::{Upstream, UpstreamFailure, UpstreamIo, UpstreamTarget},
    },
    policy::{PolicyStore, Protocol, RequestFacts, Verdict as PolicyVerdict},
    store::{PolicyRecord, TlsRecord},
    tls::{
        leaf::LeafCache,
        upstream::{describe_io_error, server_name, UpstreamTls},
    },
};

/// Live counters, reported by `guard-agent status`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Redirected connections accepted.
    pub redirected: AtomicU64,
    /// Connections open now.
    pub active: AtomicU64,
    /// Connections that ended in an error (upstream refused, reset, ...).
    pub errors: AtomicU64,
    /// Accepted connections with no original destination (not redirected).
    pub unknown: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct CounterSnapshot {
    pub redirected: u64,
    pub active: u64,
    pub errors: u64,
    pub unknown: u64,
}

impl Counters {
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            redirected: self.redirected.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            unknown: self.unknown.load(Ordering::Relaxed),
        }
    }
}

/// What every connection task needs.
pub struct Intercept {
    pub table: OriginalDstTable,
    pub procs: Arc<ProcCache>,
    pub sink: EventSink,
    pub counters: Arc<Counters>,
    /// `SO_MARK` for upstream sockets, so the kernel programs skip them.
    pub mark: u32,
    /// HTTP(S) inspection: TLS, policy, detectors.
    pub inspect: Arc<InspectSettings>,
    /// The agent's resolver, which also serves redirected DNS over TCP.
    pub dns: Option<Arc<crate::dns::Resolver>>,
    /// Names learnt from DNS answers, for connections without SNI or Host.
    pub names: Arc<crate::dns::NameMap>,
    /// Holds for `RequireApproval` requests.
    pub approvals: Arc<crate::approval::Approvals>,
    /// Credentials injected on the way out.
    /// Credential injection; swapped whole when SIGHUP reloads the file.
    pub secrets: Arc<arc_swap::ArcSwap<crate::secrets::Secrets>>,
}

/// What the inspecting paths need besides the L4 ones.
pub struct InspectSettings {
    pub leaves: Arc<LeafCache>,
    pub upstream_tls: Arc<UpstreamTls>,
    pub policy: Arc<PolicyStore>,
    pub inspector: Arc<Inspector>,
    /// Terminate TLS (false: splice all TLS, recording the SNI).
    pub inspect_tls: bool,
    /// SNI globs that are spliced, never decrypted (pinned certificates, mTLS).
    pub passthrough: GlobSet,
}

/// The destination as the application asked for it (IPv4 unmapped).
pub fn original_addr(o: &OriginalDst) -> SocketAddr {
    let ip = Ipv6Addr::from(o.dst.addr).to_canonical();
    SocketAddr::new(ip, o.dst.port)
}

fn comm_str(comm: &[u8]) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Closes a client connection with a TCP reset.
fn reset(stream: TcpStream) {
    // Linger 0 on a non-blocking socket: close sends RST at once, nothing blocks.
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Looks the original destination up; the kernel publishes it before the
/// accept completes, a few retries cover scheduling delays.
async fn original_destination(table: &OriginalDstTable, peer: SocketAddr) -> Option<OriginalDst> {
    for attempt in 0..3 {
        if let Some(o) = table.take(peer) {
            if attempt > 0 {
                tracing::debug!(attempt, "original destination found after a retry");
            }
            return Some(o);
        }
        tokio::time::sleep(Duration::from_millis(1 << attempt)).await;
    }
    None
}

/// Serves one redirected connection start to end (see [`super::workers`]
/// for the thread it runs on); `stop` ends it when the agent stops.
pub async fn handle(
    ctx: Arc<Intercept>,
    client: TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let mut ev = Event::connection(OffsetDateTime::now_utc());
    ev.src = Some(peer.to_string());
    ev.conn_id = Some(rand::random::<u64>() >> 11); // exact in JSON numbers

    let Some(orig) = original_destination(&ctx.table, peer).await else {
        ctx.counters.unknown.fetch_add(1, Ordering::Relaxed);
        ev.verdict = Verdict::Error;
        ev.error = Some(
            "no original destination: the connection was not redirected by Guard's kernel programs"
                .into(),
        );
        reset(client);
        finish(&ctx, ev, started).await;
        return;
    };
    ctx.counters.redirected.fetch_add(1, Ordering::Relaxed);
    ctx.counters.active.fetch_add(1, Ordering::Relaxed);

    let dst = original_addr(&orig);
    if dst.port() == guard_common::DNS_PORT {
        if let Some(dns) = &ctx.dns {
            // DNS over TCP goes through the resolver, one event per query.
            ctx.counters.active.fetch_sub(1, Ordering::Relaxed);
            let _ = client.set_nodelay(true);
            dns.serve_tcp(client, orig, peer, stop).await;
            return;
        }
    }
    ev.dst = Some(dst.to_string());
    // A name this address was resolved from; SNI or Host replace it.
    ev.host = ctx.names.name_for(dst.ip(), Instant::now());

    // The upstream SYN goes out first: everything else on this path (the
    // client's socket options, /proc) overlaps with its handshake.
    let procs = Arc::clone(&ctx.procs);
    let (upstream, info) = tokio::join!(connect_tcp(dst, ctx.mark), async {
        let _ = client.set_nodelay(true);
        procs.lookup(orig.tgid).await
    });
    attribute(&mut ev, &orig, &info, &ctx.procs, &ctx.inspect.inspector);

    match upstream {
        Err(e) => {
            ev.verdict = Verdict::Error;
            ev.error = Some(describe_connect_error(&e));
            reset(client);
        }
        Ok(up) => {
            let counts = Arc::new(ByteCounts::default());
            let facts = base_facts(&ev, dst);
            let outcome = tokio::select! {
                r = carry(&ctx, client, up, &mut ev, facts, dst, &counts) => r,
                _ = crate::shutdown::stopped(&mut stop) => Some("agent stopped while the connection was open".to_owned()),
            };
            ev.bytes_out = counts.out.load(Ordering::Relaxed);
            ev.bytes_in = counts.inbound.load(Ordering::Relaxed);
            if outcome.is_some() && ev.error.is_none() {
                ev.error = outcome;
            }
        }
    }
    if ev.verdict == Verdict::Error || ev.error.is_some() {
        ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
    }
    ctx.counters.active.fetch_sub(1, Ordering::Relaxed);
    finish(&ctx, ev, started).await;
}

/// Fills in who made a connection or query: the kernel's record (ids,
/// comm, cgroup) and what /proc says about the process. The command line
/// is masked: it comes from the process, not from a request, so the
/// pipeline never saw it (`curl -d card=...`, `--token ghp_...`).
pub fn attribute(
    ev: &mut Event,
    orig: &OriginalDst,
    info: &ProcInfo,
    procs: &ProcCache,
    inspector: &Inspector,
) {
    ev.pid = Some(orig.tgid);
    ev.tid = Some(orig.pid);
    ev.uid = Some(orig.uid);
    ev.gid = Some(orig.gid);
    ev.cgroup_id = Some(orig.cgroup_id);
    ev.comm = Some(comm_str(&orig.comm));
    ev.user = procs.user_name(orig.uid);
    ev.exe = info.exe.clone();
    ev.cmdline = info
        .masked_cmdline(|c| {
            inspector
                .mask_command_line_for_record(c.as_bytes())
                .map(|m| String::from_utf8_lossy(&m).into_owned())
        })
        .map(str::to_owned);
    ev.ancestors = info.ancestors.clone();
    ev.cgroup = info.cgroup.clone();
    ev.unit = info.unit.clone();
}

async fn finish(ctx: &Intercept, mut ev: Event, started: Instant) {
    let elapsed = started.elapsed();
    ev.closed_at = Some(ev.ts + elapsed);
    ev.duration_ms = Some(elapsed.as_secs_f64() * 1000.0);
    ctx.sink.record(ev).await;
}

/// Policy facts about the process and destination, shared by every decision
/// on this connection.
fn base_facts(ev: &Event, dst: SocketAddr) -> RequestFacts {
    RequestFacts {
        exe: ev.exe.clone(),
        comm: ev.comm.clone(),
        ancestors: ev.ancestors.iter().map(|a| a.exe.clone()).collect(),
        user: ev.user.clone(),
        uid: ev.uid,
        cgroup: ev.cgroup.clone(),
        systemd_unit: ev.unit.clone(),
        dest_host: ev.host.clone(),
        dest_ip: Some(dst.ip()),
        dest_port: Some(dst.port()),
        ..Default::default()
    }
}

/// How long a client may stay silent before its first bytes; the upstream
/// speaking first ends the wait at once (server-first protocols).
const SNIFF_TIMEOUT: Duration = Duration::from_secs(120);

/// Carries one connection: finds out what the client speaks, then inspects
/// (TLS terminated or plaintext HTTP/1) or splices. Returns an error text.
async fn carry(
    ctx: &Intercept,
    client: TcpStream,
    up: TcpStream,
    ev: &mut Event,
    mut facts: RequestFacts,
    dst: SocketAddr,
    counts: &Arc<ByteCounts>,
) -> Option<String> {
    let sniff = tokio::select! {
        p = peek_classify(&client, MAX_SNIFF_BYTES, SNIFF_TIMEOUT) => match p {
            Ok(p) => p.sniff,
            Err(e) => return Some(format!("reading from the client failed: {e}")),
        },
        _ = up.readable() => Sniff::Opaque,
    };
    let settings = &ctx.inspect;
    match sniff {
        Sniff::Malformed { reason } => {
            ev.verdict = Verdict::Error;
            reset(client);
            Some(format!("malformed TLS ClientHello: {reason}"))
        }
        Sniff::Tls(hello) => {
            let sni = hello.sni.clone();
            if sni.is_some() {
                ev.host = sni.clone();
            }
            let passthrough = !settings.inspect_tls
                || sni
                    .as_deref()
                    .is_some_and(|s| settings.passthrough.is_match(s));
            if passthrough {
                ev.tls = Some(TlsRecord {
                    sni,
                    passthrough: true,
                    ..Default::default()
                });
                facts.dest_host = ev.host.clone();
                facts.protocol = Some(Protocol::Tls);
                return l4_splice(ctx, client, up, ev, &facts, counts).await;
            }
            inspect_tls(ctx, client, up, ev, facts, dst, hello, counts).await
        }
        Sniff::Http1(_) | Sniff::Http2PriorKnowledge => {
            // Plaintext HTTP/2 (h2c with prior knowledge, as plaintext gRPC
            // speaks) goes upstream as HTTP/2 too.
            let target = UpstreamTarget {
                addr: dst,
                mark: ctx.mark,
                tls: None,
                alpn: h2_prior_knowledge(&sniff),
                in_tunnel: false,
            };
            let upstream = Upstream::start(target, UpstreamIo::Tcp(up))
                .await
                .map(Arc::new);
            let conn = conn_context(ctx, ev, dst, None, "http", upstream, facts);
            pipeline::serve(CountingIo::new(client, Arc::clone(counts)), conn)
                .await
                .err()
        }
        Sniff::Opaque | Sniff::NeedMore => {
            facts.protocol = Some(Protocol::Tcp);
            l4_splice(ctx, client, up, ev, &facts, counts).await
        }
    }
}

/// The protocols a plaintext upstream is spoken to in: HTTP/2 when the
/// client opened with its preface (prior knowledge), else HTTP/1.1.
pub fn h2_prior_knowledge(sniff: &Sniff) -> Vec<String> {
    match sniff {
        Sniff::Http2PriorKnowledge => vec!["h2".to_owned()],
        _ => Vec::new(),
    }
}

/// Applies the connection-level policy, then splices.
async fn l4_splice(
    ctx: &Intercept,
    client: TcpStream,
    up: TcpStream,
    ev: &mut Event,
    facts: &RequestFacts,
    counts: &ByteCounts,
) -> Option<String> {
    let decision = ctx.inspect.policy.current().decide(facts);
    if let PolicyVerdict::Block { reason } = &decision.action {
        ev.verdict = Verdict::Block;
        ev.policy = Some(PolicyRecord {
            rule: decision.rule.to_string(),
            action: "block".into(),
            mode: "enforce".into(),
            would_have: None,
            reason: Some(reason.to_string()),
        });
        reset(client);
        return None;
    }
    // A connection Guard cannot read is held as a whole: nothing is spliced
    // before an approval (or a grant); a denial resets it.
    if let PolicyVerdict::RequireApproval { timeout, reason } = &decision.action {
        if ev.id == 0 {
            ev.id = ctx.sink.reserve_id();
        }
        ev.policy = Some(PolicyRecord {
            rule: decision.rule.to_string(),
            action: "require_approval".into(),
            mode: "enforce".into(),
            would_have: None,
            reason: Some(reason.to_string()),
        });
        let what = crate::approval::HeldRequest {
            method: "CONNECT".into(),
            scheme: match facts.protocol {
                Some(Protocol::Tls) => "tls".into(),
                _ => "tcp".into(),
            },
            host: ev
                .host
                .clone()
                .or_else(|| facts.dest_ip.map(|ip| ip.to_string()))
                .unwrap_or_default(),
            path: String::new(),
            query: None,
            body_preview: None,
        };
        let admitted = ctx
            .approvals
            .admit(ev, what, &decision.rule, *timeout, reason)
            .await;
        if admitted.is_err() {
            ev.verdict = Verdict::Block;
            reset(client);
            return None;
        }
    }
    splice(client, up, counts)
        .await
        .err()
        .map(|e| format!("connection ended with an error: {e}"))
}

fn conn_context(
    ctx: &Intercept,
    ev: &Event,
    dst: SocketAddr,
    sni: Option<String>,
    scheme: &'static str,
    upstream: Result<Arc<Upstream>, UpstreamFailure>,
    facts: RequestFacts,
) -> Arc<ConnContext> {
    let mut template = ev.clone();
    template.bytes_in = 0;
    template.bytes_out = 0;
    Arc::new(ConnContext {
        template,
        dst,
        sni,
        scheme,
        upstream,
        policy: ctx.inspect.policy.current(),
        inspector: Arc::clone(&ctx.inspect.inspector),
        sink: ctx.sink.clone(),
        facts,
        approvals: Arc::clone(&ctx.approvals),
        secrets: ctx.secrets.load_full(),
        inspect: Arc::clone(&ctx.inspect),
        mark: ctx.mark,
    })
}

/// Terminates the client's TLS with a leaf for its SNI (after the upstream
/// handshake, so both sides agree on ALPN) and serves HTTP on it.
#[allow(clippy::too_many_arguments)]
async fn inspect_tls(
    ctx: &Intercept,
    client: TcpStream,
    up: TcpStream,
    ev: &mut Event,
    facts: RequestFacts,
    dst: SocketAddr,
    hello: ClientHelloInfo,
    counts: &Arc<ByteCounts>,
) -> Option<String> {
    let name = server_name(hello.sni.as_deref(), dst.ip());
    let client = CountingIo::new(client, Arc::clone(counts));
    let upstream_via = UpstreamVia {
        addr: dst,
        mark: ctx.mark,
        in_tunnel: false,
    };
    match terminate_tls(
        &ctx.inspect,
        client,
        UpstreamIo::Tcp(up),
        upstream_via,
        &hello,
        name,
        Some(dst.ip()),
    )
    .await
    {
        Err(TlsFailed::Mint { error, client }) => {
            reset(client.into_inner());
            Some(error)
        }
        Err(TlsFailed::Handshake { error, record }) => {
            ev.verdict = Verdict::Error;
            ev.tls = Some(record);
            Some(error)
        }
        Ok(t) => {
            ev.tls = Some(t.record);
            if let Err(f) = &t.upstream {
                ev.verdict = Verdict::Error;
                ev.error = Some(f.reason.clone());
            }
            let conn = conn_context(ctx, ev, dst, hello.sni, "https", t.upstream, facts);
            pipeline::serve(t.tls, conn).await.err()
        }
    }
}

/// Where an inspected connection's upstream is: the original destination,
/// or a tunnel through the proxy there.
pub struct UpstreamVia {
    pub addr: SocketAddr,
    pub mark: u32,
    /// A tunnel through the proxy at `addr`, already open on `up`.
    pub in_tunnel: bool,
}

/// A client's TLS, terminated, and the upstream it is relayed to.
pub struct Terminated<IO> {
    pub tls: tokio_rustls::server::TlsStream<IO>,
    pub record: TlsRecord,
    /// The upstream, or why it failed (then every request gets a 502).
    pub upstream: Result<Arc<Upstream>, UpstreamFailure>,
}

/// Why a client's TLS was not terminated.
pub enum TlsFailed<IO> {
    /// No certificate could be minted; the client is handed back unanswered.
    Mint { error: String, client: IO },
    /// The client's handshake failed (it does not trust the Guard CA, ...).
    Handshake { error: String, record: TlsRecord },
}

/// The TLS handshakes of an inspected connection: first with the upstream
/// over `up` (verified for `name`, offering the ALPN the client offered),
/// then with the client, offered what the upstream chose and a leaf for its
/// SNI (or `leaf_ip` when it sent none).
pub async fn terminate_tls<IO>(
    settings: &InspectSettings,
    client: IO,
    up: UpstreamIo,
    via: UpstreamVia,
    hello: &ClientHelloInfo,
    name: Result<rustls::pki_types::ServerName<'static>, crate::tls::upstream::UpstreamError>,
    leaf_ip: Option<std::net::IpAddr>,
) -> Result<Terminated<IO>, TlsFailed<IO>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let offered: Vec<String> = hello
        .alpn
        .iter()
        .filter(|p| *p == "h2" || *p == "http/1.1")
        .cloned()
        .collect();
    let upstream = match name {
        Ok(name) => {
            let target = UpstreamTarget {
                addr: via.addr,
                mark: via.mark,
                tls: Some((Arc::clone(&settings.upstream_tls), name)),
                alpn: offered.clone(),
                in_tunnel: via.in_tunnel,
            };
            Upstream::start(target, up).await.map(Arc::new)
        }
        Err(e) => Err(UpstreamFailure {
            reason: e.to_string(),
            tls: true,
        }),
    };
    // Offer the client what the upstream chose; HTTP/1.1 when it chose none.
    let client_alpn: Vec<String> = match upstream.as_ref().ok().and_then(|u| u.alpn.clone()) {
        Some(p) => vec![p],
        None => offered.into_iter().filter(|p| p == "http/1.1").collect(),
    };
    let config = match settings.leaves.server_config(&client_alpn, leaf_ip) {
        Ok(c) => c,
        Err(e) => {
            return Err(TlsFailed::Mint {
                error: format!("cannot mint a certificate: {e}"),
                client,
            })
        }
    };
    let tls = match tokio_rustls::TlsAcceptor::from(config).accept(client).await {
        Ok(t) => t,
        Err(e) => {
            return Err(TlsFailed::Handshake {
                error: format!(
                    "the client rejected the TLS handshake: {} (does it trust the Guard CA? `guard-agent ca export`)",
                    describe_io_error(&e)
                ),
                record: TlsRecord {
                    sni: hello.sni.clone(),
                    upstream_alpn: upstream.as_ref().ok().and_then(|u| u.alpn.clone()),
                    ..Default::default()
                },
            })
        }
    };
    let (_, session) = tls.get_ref();
    let record = TlsRecord {
        sni: hello.sni.clone(),
        alpn: session
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        version: session.protocol_version().map(|v| format!("{v:?}")),
        upstream_alpn: upstream.as_ref().ok().and_then(|u| u.alpn.clone()),
        upstream_version: upstream.as_ref().ok().and_then(|u| u.tls_version.clone()),
        passthrough: false,
    };
    Ok(Terminated {
        tls,
        record,
        upstream,
    })
}
