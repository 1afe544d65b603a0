//! The per-request pipeline, one named step after another:
//! read → inspect (DLP) → decide (policy) → act (allow, mask, block, hold
//! for approval) → inject credentials → forward → record. Serves one client
//! connection with hyper (HTTP/1.1 or HTTP/2, whichever it speaks).
//!
//! Invariants: a request leaves only after the decision; a blocked request
//! never leaves; every request ends in exactly one event, and what the event
//! holds went through masking first (header credentials fingerprinted,
//! excerpts masked, findings carry masks only); a held request leaves only
//! once approved (or covered by a grant); credentials are injected last,
//! after everything recorded was taken, so no event holds a secret.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    body::{buffer_up_to, chain, full, Buffered, PipeBody, RecordingBody},
    headers::{asks_to_close, record_headers, strip_hop_by_hop},
    inspect::{Inspector, Located, RequestInspection, EXCERPT_BYTES, MAX_INSPECT_BYTES},
    tunnel::{self, ConnectEvent, Connected, TunnelRequest},
    upstream::{SendError, Upstream, UpstreamFailure},
};
use crate::{
    approval::{Approvals, Denial, HeldRequest},
    policy::{
        CompiledPolicy, Decision, FindingFact, Mode, Protocol, RequestFacts,
        Verdict as PolicyVerdict,
    },
    secrets::Secrets,
    store::{Event, EventKind, EventSink, HttpRecord, PolicyRecord, Verdict},
};

/// What every request on one client connection shares.
pub struct ConnContext {
    /// Attribution and destination, copied into every request's event.
    pub template: Event,
    pub dst: SocketAddr,
    /// SNI the client sent (TLS only).
    pub sni: Option<String>,
    pub scheme: &'static str,
    /// The upstream, or why it could not be reached (every request then
    /// gets a 502 naming the problem).
    pub upstream: Result<Arc<Upstream>, UpstreamFailure>,
    pub policy: Arc<CompiledPolicy>,
    pub inspector: Arc<Inspector>,
    pub sink: EventSink,
    /// Policy facts about the process (filled once per connection).
    pub facts: RequestFacts,
    /// Where `RequireApproval` requests wait.
    pub approvals: Arc<Approvals>,
    /// Credentials injected into requests on their way out.
    pub secrets: Arc<Secrets>,
    /// TLS settings, for connections inside a CONNECT tunnel.
    pub inspect: Arc<crate::intercept::listener::InspectSettings>,
    /// `SO_MARK` for new upstream sockets (a tunnel's).
    pub mark: u32,
}

/// Serves HTTP on a client connection until it closes.
pub async fn serve<IO>(io: IO, ctx: Arc<ConnContext>) -> Result<(), String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Upgraded streams (WebSocket) outlive the HTTP connection future: wait
    // for them, so the connection ends (and is counted) when they do.
    // If this future is dropped (the agent stops), `_stop` goes with it and
    // the upgraded sessions end and record themselves.
    let upgrades = Upgrades::default();
    let (_stop, stopped) = tokio::sync::watch::channel(());
    let closing = Arc::new(Closing::default());
    let tasks = upgrades.clone();
    let close = Arc::clone(&closing);
    let svc = service_fn(move |req| {
        let ctx = Arc::clone(&ctx);
        let tasks = tasks.clone();
        let stopped = stopped.clone();
        let close = Arc::clone(&close);
        async move {
            let resp = handle(req, ctx, tasks, stopped).await;
            if resp.extensions().get::<CloseUnanswered>().is_some() {
                close.start();
                return Err(TunnelClosed(h2::Error::from(h2::Reason::REFUSED_STREAM)));
            }
            Ok(resp)
        }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let res = tokio::select! {
        r = conn.as_mut() => r,
        () = closing.notify.notified() => {
            // HTTP/2: no new streams (GOAWAY); the others finish.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    let pending = std::mem::take(&mut *upgrades.0.lock().unwrap_or_else(|e| e.into_inner()));
    for t in pending {
        let _ = t.await;
    }
    match res {
        // Closed on purpose, the event already recorded.
        Err(_) if closing.started.load(Ordering::Relaxed) => Ok(()),
        r => r.map_err(|e| e.to_string()),
    }
}

/// Marks the response of a request that found its proxy tunnel closed
/// (see [`tunnel_closed`]): it is not sent, the client's connection closes.
#[derive(Clone, Copy)]
struct CloseUnanswered;

/// The service error for such a request: hyper closes an HTTP/1 connection
/// without an answer, and resets an HTTP/2 stream with the reason found in
/// the error's source, `REFUSED_STREAM` (not processed: safe to retry).
#[derive(Debug)]
struct TunnelClosed(h2::Error);

impl std::fmt::Display for TunnelClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the tunnel through the proxy closed")
    }
}

impl std::error::Error for TunnelClosed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// A client connection that is to close because its tunnel did.
#[derive(Default)]
struct Closing {
    started: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Closing {
    fn start(&self) {
        self.started.store(true, Ordering::Relaxed);
        // A stored permit: `serve` sees it even if it is not waiting yet.
        self.notify.notify_one();
    }
}

/// The tasks carrying upgraded streams of one connection.
#[derive(Clone, Default)]
struct Upgrades(Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>);

fn host_of(req: &Request<Incoming>, ctx: &ConnContext) -> String {
    let from_uri = req.uri().host().map(str::to_owned);
    let from_header = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| {
            h.rsplit_once(':')
                .filter(|(_, p)| p.parse::<u16>().is_ok())
                .map(|(a, _)| a)
                .unwrap_or(h)
                .to_owned()
        });
    from_uri
        .or(from_header)
        .or_else(|| ctx.sni.clone())
        .unwrap_or_else(|| ctx.dst.ip().to_string())
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

/// The destination name policy decides on, and the one "goes home" trusts,
/// from what the client cannot choose freely. Over TLS it is the server name
/// the upstream certificate was verified for: a `Host` header naming another
/// service changes neither (the request still goes to the verified server).
/// Over plaintext HTTP the `Host` header is all there is, unless the
/// connection's address was resolved from another name (then that name);
/// a plaintext `Host` never makes a secret "go home" unless the resolver saw
/// the same name for this address. The `Host` sent is kept in the record.
fn decision_host(ctx: &ConnContext, claimed: &str) -> (String, String) {
    let ip = ctx.dst.ip().to_string();
    if ctx.scheme == "https" {
        return match ctx.sni.as_deref() {
            Some(sni) => {
                let sni = sni.to_ascii_lowercase();
                (sni.clone(), sni)
            }
            None => (claimed.to_owned(), ip),
        };
    }
    match ctx.template.host.as_deref().map(str::to_ascii_lowercase) {
        Some(learned) => (learned.clone(), learned),
        None => (claimed.to_owned(), ip),
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<PipeBody> {
    let bytes = serde_json::to_vec_pretty(&body).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, bytes.len())
        .header("x-guard", "1")
        .body(full(bytes))
        .expect("valid response")
}

fn verdict_name(v: &PolicyVerdict) -> &'static str {
    match v {
        PolicyVerdict::Allow => "allow",
        PolicyVerdict::Block { .. } => "block",
        PolicyVerdict::Mask(_) => "mask",
        PolicyVerdict::RequireApproval { .. } => "require_approval",
        PolicyVerdict::AuditOnly => "audit_only",
    }
}

fn policy_record(d: &Decision) -> PolicyRecord {
    PolicyRecord {
        rule: d.rule.to_string(),
        action: verdict_name(&d.action).to_owned(),
        mode: match d.mode {
            Mode::Enforce => "enforce".into(),
            Mode::Monitor => "monitor".into(),
        },
        would_have: d.would_have.as_ref().map(|v| verdict_name(v).to_owned()),
        reason: (!d.reason.is_empty()).then(|| d.reason.to_string()),
    }
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

async fn handle(
    mut req: Request<Incoming>,
    ctx: Arc<ConnContext>,
    upgrades: Upgrades,
    stopped: tokio::sync::watch::Receiver<()>,
) -> Response<PipeBody> {
    let started = Instant::now();
    let mut ev = ctx.template.clone();
    ev.kind = EventKind::Http;
    ev.ts = OffsetDateTime::now_utc();
    let claimed_host = host_of(&req, &ctx);
    let (host, home_host) = decision_host(&ctx, &claimed_host);
    ev.host = Some(host.clone());
    decline_h2c_upgrade(req.headers_mut());
    let is_upgrade = req.headers().contains_key(header::UPGRADE) || req.method() == Method::CONNECT;
    let mut rec = HttpRecord {
        method: req.method().to_string(),
        scheme: ctx.scheme.to_owned(),
        host: claimed_host,
        // A CONNECT's target is `host:port`, recorded as its path (what
        // `events show` prints after the method, as curl -v does).
        path: match (req.method(), req.uri().authority()) {
            (&Method::CONNECT, Some(a)) => a.as_str().to_owned(),
            _ => req.uri().path().to_owned(),
        },
        query: req.uri().query().map(str::to_owned),
        version: version_str(req.version()).to_owned(),
        ..Default::default()
    };

    // 1. Read the body (up to the inspection limit).
    let (mut parts, body) = req.into_parts();
    let (body_bytes, rest) = match buffer_up_to(body, MAX_INSPECT_BYTES).await {
        Ok(Buffered::Complete(b)) => (b, None),
        Ok(Buffered::Partial { head, rest }) => (head, Some(rest)),
        Err(e) => {
            ev.verdict = Verdict::Error;
            ev.error = Some(format!("reading the request body failed: {e}"));
            finish(&ctx, ev, rec, started);
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": "bad request body"}),
            );
        }
    };

    // 2. Inspect.
    let mut inspection = ctx
        .inspector
        .inspect_request(&parts, &body_bytes, &home_host);
    if rest.is_some() {
        ev.error = Some(format!(
            "request body larger than {} MiB: only its start was inspected",
            MAX_INSPECT_BYTES >> 20
        ));
    }
    if let Some(e) = &inspection.body_error {
        ev.error = Some(format!("body not inspected: {e}"));
    }

    // 3. Decide.
    let mut facts = ctx.facts.clone();
    facts.dest_host = Some(host.clone());
    facts.method = Some(parts.method.to_string());
    facts.path = Some(parts.uri.path().to_owned());
    facts.protocol = Some(if ctx.scheme == "https" {
        Protocol::Https
    } else {
        Protocol::Http
    });
    facts.findings = inspection
        .findings
        .iter()
        .map(|l| FindingFact::new(&l.finding.detector, l.goes_home))
        .collect();
    let decision = ctx.policy.decide(&facts);
    ev.policy = Some(policy_record(&decision));

    // Record the request as it is known now (masked for the record).
    let key = &ctx.inspector.key;
    rec.request_headers = std::mem::take(&mut inspection.header_record);
    rec.request_bytes = body_bytes.len() as u64;
    if let Some(masked_url) = &inspection.url {
        let (p, q) = masked_url
            .split_once('?')
            .map(|(p, q)| (p, Some(q)))
            .unwrap_or((masked_url, None));
        rec.path = p.to_owned();
        rec.query = q.map(str::to_owned);
    }

    // 4. Act.
    let (block_reason, mask) = match &decision.action {
        PolicyVerdict::Block { reason } => (Some(reason.to_string()), None),
        // Held below, once the record is ready.
        PolicyVerdict::RequireApproval { .. } => (None, None),
        PolicyVerdict::Mask(scope) => (None, Some(scope.clone())),
        PolicyVerdict::Allow | PolicyVerdict::AuditOnly => (None, None),
    };
    let masking = mask.as_ref().is_some_and(|scope| {
        inspection
            .findings
            .iter()
            .any(|l| scope.applies_to(&l.finding.detector, l.goes_home))
    });
    let applied = |l: &Located| {
        mask.as_ref()
            .is_some_and(|s| s.applies_to(&l.finding.detector, l.goes_home))
    };
    ev.findings = inspection
        .findings
        .iter()
        .map(|l| l.record(&ctx.inspector, applied(l)))
        .collect();
    // A scope that leaves some findings alone (named detectors, secrets
    // going home): rewrite only the others.
    if masking && !inspection.findings.iter().all(applied) {
        if let Some(scope) = &mask {
            let keep = |det: &str, home: bool| scope.applies_to(det, home);
            inspection =
                ctx.inspector
                    .inspect_request_scoped(&parts, &body_bytes, &home_host, Some(&keep));
        }
    }
    let excerpt_src = if masking {
        inspection.body.as_deref()
    } else {
        None
    };
    rec.request_excerpt = ctx.inspector.excerpt(excerpt_src.unwrap_or(&body_bytes));

    if let Some(reason) = block_reason {
        ev.verdict = Verdict::Block;
        name_event(&ctx, &mut ev);
        let names: Vec<&str> = ev.findings.iter().map(|f| f.detector.as_str()).collect();
        let body = json!({
            "error": "blocked by Guard",
            "reason": reason,
            "rule": decision.rule.as_ref(),
            "findings": names,
            "event_id": ev.id,
            "exception": format!(
                "ask an administrator: `guard-agent events --json` shows event {} and the rule that blocked it",
                ev.id
            ),
        });
        rec.status = Some(403);
        finish(&ctx, ev, rec, started);
        return json_response(StatusCode::FORBIDDEN, body);
    }
    if let PolicyVerdict::RequireApproval { timeout, reason } = &decision.action {
        if let Some(body) =
            await_approval(&ctx, &mut ev, &rec, &decision.rule, *timeout, reason).await
        {
            ev.verdict = Verdict::Block;
            rec.status = Some(403);
            finish(&ctx, ev, rec, started);
            return json_response(StatusCode::FORBIDDEN, body);
        }
    }
    if masking {
        ev.verdict = Verdict::Mask;
        apply_masks(&ctx.inspector, &mut parts, &inspection);
    }

    // 5. Inject credentials (after everything recorded was taken), for the
    // destination the agent verified, not the one the client claims.
    let target = if ctx.secrets.is_empty() {
        host.clone()
    } else {
        verified_host(&ctx, &host).await
    };
    if let Err(e) = ctx.secrets.inject(&target, &mut parts) {
        ev.verdict = Verdict::Block;
        name_event(&ctx, &mut ev);
        ev.error = Some(e.to_string());
        rec.status = Some(403);
        let body = json!({
            "error": "blocked by Guard",
            "reason": e.to_string(),
            "event_id": ev.id,
        });
        finish(&ctx, ev, rec, started);
        return json_response(StatusCode::FORBIDDEN, body);
    }

    // 6. Forward. A CONNECT to a proxy opens a tunnel through it, and
    // what goes through the tunnel is inspected in turn.
    if parts.method == Method::CONNECT {
        return connect_tunnel(&ctx, parts, ev, rec, started, &upgrades, stopped).await;
    }
    let upstream = match &ctx.upstream {
        Ok(u) => Arc::clone(u),
        Err(fail) => {
            let error = if fail.tls {
                "upstream TLS failed"
            } else {
                "upstream unreachable"
            };
            return bad_gateway(&ctx, ev, rec, started, fail, error);
        }
    };
    // Bytes of a request body beyond the inspection limit, streamed on.
    let streamed = Arc::new(AtomicU64::new(0));
    let out_body = match (masking, rest) {
        (true, rest) => {
            let b = inspection
                .body
                .clone()
                .map(Bytes::from)
                .unwrap_or(body_bytes);
            match rest {
                Some(rest) => chain(b, rest, Arc::clone(&streamed)),
                None => {
                    parts
                        .headers
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
                    full(b)
                }
            }
        }
        (false, Some(rest)) => chain(body_bytes, rest, Arc::clone(&streamed)),
        (false, None) => full(body_bytes),
    };
    let client_upgrade = if is_upgrade {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    let mut up_req = Request::from_parts(parts, out_body);
    prepare_upstream_request(
        &mut up_req,
        &host,
        ctx.scheme,
        upstream.is_http1().await,
        is_upgrade,
    );

    let resp = match upstream.send(up_req).await {
        Ok(r) => r,
        Err(SendError::Failed(fail)) => {
            return bad_gateway(&ctx, ev, rec, started, &fail, "upstream failed")
        }
        Err(SendError::TunnelClosed) => return tunnel_closed(&ctx, ev, rec, started),
    };
    let mut resp = resp;
    rec.ttfb_ms = Some(ms(started));
    rec.status = Some(resp.status().as_u16());
    // An upgraded exchange is recorded when its session ends (see
    // `upgrade::carry`); the response-body step hands it the event.
    let mut upgraded_event = None;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_side) = client_upgrade {
            rec.upgrade = resp
                .headers()
                .get(header::UPGRADE)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.to_ascii_lowercase());
            let upstream_side = hyper::upgrade::on(&mut resp);
            let (tx, rx) = tokio::sync::oneshot::channel();
            upgraded_event = Some(tx);
            let task = tokio::spawn(super::upgrade::carry(
                client_side,
                upstream_side,
                rx,
                ctx.sink.clone(),
                started,
                stopped,
            ));
            upgrades
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(task);
        }
    }
    rec.response_headers = record_headers(resp.headers(), key, |n, v| {
        ctx.inspector.mask_header_for_record(n, v)
    });

    // 7. Respond, recording when the response body ends. A server inside a
    // proxy tunnel that closes its connection ends the tunnel, and the
    // client's connection ends with it, as through the proxy alone.
    let (mut rparts, rbody) = resp.into_parts();
    let close_client =
        upstream.in_tunnel() && asks_to_close(&rparts.headers) && rec.version != "HTTP/2";
    strip_hop_by_hop(
        &mut rparts.headers,
        rparts.status == StatusCode::SWITCHING_PROTOCOLS,
    );
    if close_client {
        rparts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let ctx2 = Arc::clone(&ctx);
    let body = RecordingBody::new(
        rbody,
        EXCERPT_BYTES + 512,
        Box::new(move |bytes, head, error| {
            rec.response_bytes = bytes;
            rec.request_bytes += streamed.load(Ordering::Relaxed);
            rec.total_ms = Some(ms(started));
            rec.response_excerpt = ctx2.inspector.excerpt(&head);
            if error.is_some() && ev.error.is_none() {
                ev.error = error;
            }
            ev.http = Some(rec);
            ev.closed_at = Some(OffsetDateTime::now_utc());
            ev.duration_ms = Some(ms(started));
            let ev = match upgraded_event {
                Some(tx) => match tx.send(ev) {
                    Ok(()) => return,
                    Err(ev) => ev,
                },
                None => ev,
            };
            ctx2.sink.record_soon(ev);
        }),
    );
    Response::from_parts(rparts, body.boxed_unsync())
}

/// Declines an upgrade to h2c (HTTP/2 over plaintext, RFC 7540 §3.2, which
/// RFC 9113 dropped), as any server may: after it, the connection would
/// carry HTTP/2 that this pipeline no longer reads, request by request.
/// The exchange stays HTTP/1.1 (h2c with prior knowledge is served as
/// HTTP/2 from the start).
fn decline_h2c_upgrade(headers: &mut http::HeaderMap) {
    let h2c = headers
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"h2c"));
    if h2c {
        headers.remove(header::UPGRADE);
        headers.remove("http2-settings");
    }
}

/// A 502 naming why the upstream failed (`error`, then the problem), and
/// its event.
fn bad_gateway(
    ctx: &ConnContext,
    mut ev: Event,
    mut rec: HttpRecord,
    started: Instant,
    fail: &UpstreamFailure,
    error: &str,
) -> Response<PipeBody> {
    ev.verdict = Verdict::Error;
    ev.error = Some(fail.reason.clone());
    rec.status = Some(502);
    name_event(ctx, &mut ev);
    let body = json!({"error": error, "problem": fail.reason, "event_id": ev.id});
    finish(ctx, ev, rec, started);
    json_response(StatusCode::BAD_GATEWAY, body)
}

/// A request whose tunnel through the proxy closed before the server
/// answered it: recorded, and answered by closing the client's connection
/// ([`serve`]), as the proxy closing the tunnel would have. The client's
/// retry opens a tunnel of its own, with its own credentials.
fn tunnel_closed(
    ctx: &ConnContext,
    mut ev: Event,
    rec: HttpRecord,
    started: Instant,
) -> Response<PipeBody> {
    ev.verdict = Verdict::Error;
    ev.error = Some(
        "the tunnel through the proxy closed before the server answered: the client's \
         connection was closed so that it retries on a tunnel of its own"
            .into(),
    );
    finish(ctx, ev, rec, started);
    let mut resp = Response::new(full(Bytes::new()));
    resp.extensions_mut().insert(CloseUnanswered);
    resp
}

/// Step 6 for a CONNECT: opens the tunnel through the proxy and answers
/// the client with the proxy's answer (see [`super::tunnel`]). The CONNECT's
/// event is recorded once the answer is known; requests inside the tunnel
/// get events of their own.
async fn connect_tunnel(
    ctx: &Arc<ConnContext>,
    mut parts: http::request::Parts,
    mut ev: Event,
    mut rec: HttpRecord,
    started: Instant,
    upgrades: &Upgrades,
    stopped: tokio::sync::watch::Receiver<()>,
) -> Response<PipeBody> {
    if parts.version > Version::HTTP_11 {
        let fail = UpstreamFailure {
            reason: "Guard looks into CONNECT tunnels only on HTTP/1.1 connections to a proxy; \
                     this one is HTTP/2"
                .into(),
            tls: false,
        };
        return bad_gateway(ctx, ev, rec, started, &fail, "proxy tunnel not supported");
    }
    let Some(request) = TunnelRequest::new(&parts) else {
        ev.verdict = Verdict::Error;
        ev.error = Some("CONNECT without a host:port target".into());
        rec.status = Some(400);
        finish(ctx, ev, rec, started);
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "CONNECT needs a host:port target"}),
        );
    };
    let client_side = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let (mut head, body, tunnel) = match tunnel::connect(ctx, &request).await {
        Ok(Connected::Tunnel {
            head,
            stream,
            early,
        }) => (head, Bytes::new(), Some((stream, early))),
        Ok(Connected::Refused { head, body }) => (head, body, None),
        Err(fail) => return bad_gateway(ctx, ev, rec, started, &fail, "proxy tunnel failed"),
    };
    rec.ttfb_ms = Some(ms(started));
    rec.status = Some(head.status.as_u16());
    rec.response_headers = record_headers(&head.headers, &ctx.inspector.key, |n, v| {
        ctx.inspector.mask_header_for_record(n, v)
    });
    rec.response_bytes = body.len() as u64;
    rec.response_excerpt = ctx.inspector.excerpt(&body);
    strip_hop_by_hop(&mut head.headers, false);
    match (tunnel, client_side) {
        (Some(stream), Some(client_side)) => {
            let sink = Arc::clone(ctx);
            let event = ConnectEvent::new(move |error, tls| {
                if let Some(e) = error {
                    ev.verdict = Verdict::Error;
                    ev.error = Some(e);
                }
                ev.tls = tls;
                finish(&sink, ev, rec, started);
            });
            let task = tunnel::spawn(ctx, request, client_side, stream, event, stopped);
            upgrades
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(task);
        }
        (Some(_), None) => {
            let fail = UpstreamFailure {
                reason: "the client's connection cannot become a tunnel".into(),
                tls: false,
            };
            return bad_gateway(ctx, ev, rec, started, &fail, "proxy tunnel failed");
        }
        (None, _) => finish(ctx, ev, rec, started),
    }
    Response::from_parts(head, full(body))
}

/// The destination name credentials may be injected for: one the agent
/// verified, never the Host header alone (a client could name a bound host
/// while connecting elsewhere). HTTPS: the SNI the upstream certificate was
/// verified against. Plaintext: the original destination address, or the
/// Host name when it resolves to that address.
async fn verified_host(ctx: &ConnContext, host: &str) -> String {
    let ip = ctx.dst.ip().to_string();
    if ctx.scheme == "https" {
        return ctx
            .sni
            .as_deref()
            .map(str::to_ascii_lowercase)
            .unwrap_or(ip);
    }
    if host == ip || host.parse::<std::net::IpAddr>().is_ok() || !ctx.secrets.binds_host(host) {
        return ip;
    }
    let resolves_there = tokio::net::lookup_host((host, ctx.dst.port()))
        .await
        .is_ok_and(|mut addrs| addrs.any(|a| a.ip().to_canonical() == ctx.dst.ip()));
    if resolves_there {
        host.to_owned()
    } else {
        ip
    }
}

/// Gives the event its id now, for a response that names it (a 403 or
/// 502 body, a hold): such events are rare, and the others get their ids
/// when the store writes them, in one contiguous run per write.
fn name_event(ctx: &ConnContext, ev: &mut Event) {
    if ev.id == 0 {
        ev.id = ctx.sink.reserve_id();
    }
}

/// Holds a `RequireApproval` request until it is approved (or a grant
/// covers it). Returns the 403 body when it was denied or timed out.
async fn await_approval(
    ctx: &ConnContext,
    ev: &mut Event,
    rec: &HttpRecord,
    rule: &str,
    timeout: std::time::Duration,
    reason: &str,
) -> Option<serde_json::Value> {
    let what = HeldRequest {
        method: rec.method.clone(),
        scheme: rec.scheme.clone(),
        host: rec.host.clone(),
        path: rec.path.clone(),
        query: rec.query.clone(),
        body_preview: rec.request_excerpt.clone(),
    };
    // The hold, its approval commands and the answer name the event.
    name_event(ctx, ev);
    match ctx.approvals.admit(ev, what, rule, timeout, reason).await {
        Ok(()) => None,
        Err(Denial::Denied { by, note }) => Some(json!({
            "error": "denied by an approver",
            "reason": reason,
            "rule": rule,
            "denied_by": by.user.clone().unwrap_or_else(|| format!("uid {}", by.uid)),
            "note": note,
            "event_id": ev.id,
        })),
        Err(Denial::TimedOut { after }) => Some(json!({
            "error": "approval timed out",
            "reason": reason,
            "rule": rule,
            "detail": format!(
                "nobody approved this request within {}; a timeout counts as a denial",
                humantime::format_duration(after)
            ),
            "event_id": ev.id,
        })),
    }
}

/// Writes masked URL and header values into the request.
fn apply_masks(inspector: &Inspector, parts: &mut http::request::Parts, i: &RequestInspection) {
    if let Some(url) = &i.url {
        if let Ok(pq) = url.parse::<http::uri::PathAndQuery>() {
            let mut up = parts.uri.clone().into_parts();
            up.path_and_query = Some(pq);
            if let Ok(u) = Uri::from_parts(up) {
                parts.uri = u;
            }
        }
    }
    inspector.apply_headers(&mut parts.headers, &i.headers);
}

/// Turns the client's request into one for the upstream connection.
fn prepare_upstream_request(
    req: &mut Request<PipeBody>,
    host: &str,
    scheme: &str,
    http1: bool,
    upgrade: bool,
) {
    strip_hop_by_hop(req.headers_mut(), upgrade && http1);
    // An HTTP/1 client that names the whole URL (`GET http://host/path`)
    // is talking to a proxy, which needs it as it is; every HTTP/1.1 server
    // accepts that form too.
    if http1 && req.version() <= Version::HTTP_11 && req.uri().scheme().is_some() {
        *req.version_mut() = Version::HTTP_11;
        return;
    }
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    if http1 {
        *req.version_mut() = Version::HTTP_11;
        if !req.headers().contains_key(header::HOST) {
            if let Some(a) = req.uri().authority() {
                if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                    req.headers_mut().insert(header::HOST, v);
                }
            }
        }
        if let Ok(u) = pq.parse() {
            *req.uri_mut() = u;
        }
    } else {
        *req.version_mut() = Version::HTTP_2;
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| host.to_owned());
        req.headers_mut().remove(header::HOST);
        if let Ok(u) = format!("{scheme}://{authority}{pq}").parse() {
            *req.uri_mut() = u;
        }
    }
}

/// Records an exchange that ended without an upstream response body.
fn finish(ctx: &ConnContext, mut ev: Event, rec: HttpRecord, started: Instant) {
    let mut rec = rec;
    rec.total_ms = Some(ms(started));
    ev.http = Some(rec);
    ev.closed_at = Some(OffsetDateTime::now_utc());
    ev.duration_ms = Some(ms(started));
    ctx.sink.record_soon(ev);
}
