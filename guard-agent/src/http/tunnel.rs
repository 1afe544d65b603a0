//! CONNECT through an explicit HTTP proxy (`HTTPS_PROXY=http://proxy:3128`
//! on a corporate network or a CI runner, or an `https://` proxy spoken to
//! over TLS, which the agent terminates and re-originates like any TLS):
//! the client's connection to the proxy is redirected like any other, and
//! its `CONNECT host:port` asks the proxy for a tunnel. Guard asks for that
//! tunnel itself, on its own connection to the proxy for this client (inside
//! its own TLS to the proxy, for an `https://` proxy: [`UpstreamIo`]),
//! answers with the proxy's answer, and then treats what the client sends
//! inside the tunnel as a connection of its own to `host:port`: TLS is
//! terminated (a leaf for the SNI, or for the CONNECT host) and every
//! request goes through the pipeline and gets its event, exactly as without
//! a proxy; plaintext HTTP likewise; anything else is carried through and
//! counted.
//!
//! Events: the CONNECT itself is one HTTP event (method CONNECT, its
//! `host:port` as the path, the proxy's status), recorded once the client's
//! first bytes inside the tunnel were handled: with the TLS inside it, or
//! the error that ended it there (a client that does not trust the Guard
//! CA). Requests inside carry the same connection id. The connection event
//! counts all bytes, tunnel included.
//!
//! Never: send the proxy anything before the policy decided on the CONNECT,
//! or let a tunnel carry bytes Guard did not classify first. A proxy that
//! refuses (407 Proxy Authentication Required, 403) has its answer passed to
//! the client as it is. When the far end speaks first (an SSH or SMTP
//! server behind the tunnel, its first bytes arriving with the proxy's
//! answer), nothing is skipped: those bytes go to the client first and the
//! tunnel is carried as it is.
//!
//! When the server inside closes its connection, the tunnel ends with it
//! and so does the client's connection, as the proxy would have ended it:
//! a `Connection: close` from the server reaches the client, and a request
//! that finds the tunnel already closed is not answered (HTTP/1: the
//! connection closes; HTTP/2: the stream is refused and the connection
//! goes away), so the client retries on a connection and tunnel of its own.
//! Guard never opens a second tunnel with the client's credentials: a proxy
//! that authenticates each connection (NTLM) would refuse it.

use std::{
    io,
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes};
use http::{request, HeaderMap, Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::{body::Incoming, upgrade::OnUpgrade};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::{
    pipeline::{self, ConnContext},
    upstream::{Upstream, UpstreamFailure, UpstreamIo, UpstreamTarget},
};
use crate::{
    intercept::{
        connect::CONNECT_TIMEOUT,
        listener::{h2_prior_knowledge, terminate_tls, TlsFailed, UpstreamVia},
        sniff::{classify, Sniff, MAX_SNIFF_BYTES},
    },
    store::TlsRecord,
    store::Verdict,
};

/// How long the client may stay silent inside a new tunnel; the upstream
/// speaking first ends the wait at once.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(120);
/// The most of a refusal's body (a 407 page) passed on to the client.
const MAX_REFUSAL_BODY: usize = 64 * 1024;

/// What Guard sends a proxy to open a tunnel: the client's CONNECT target
/// and headers (`Proxy-Authorization` included: they are the proxy's).
#[derive(Debug)]
pub struct TunnelRequest {
    /// `host:port`, as the client asked.
    pub authority: String,
    headers: HeaderMap,
}

impl TunnelRequest {
    /// The tunnel a CONNECT request asks for; None when its target is not
    /// `host:port`.
    pub fn new(parts: &request::Parts) -> Option<Self> {
        let authority = parts.uri.authority()?;
        authority.port_u16()?;
        Some(Self {
            authority: authority.as_str().to_owned(),
            headers: parts.headers.clone(),
        })
    }

    /// The host of the target (an IP address without brackets).
    pub fn host(&self) -> &str {
        self.authority
            .rsplit_once(':')
            .map_or(self.authority.as_str(), |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']')
    }

    /// The CONNECT request, with the client's headers.
    fn request<B>(&self, body: B) -> Result<Request<B>, UpstreamFailure> {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(self.authority.as_str())
            .body(body)
            .map_err(|e| UpstreamFailure {
                reason: format!("invalid CONNECT target: {e}"),
                tls: false,
            })?;
        *req.headers_mut() = self.headers.clone();
        Ok(req)
    }
}

/// The proxy's answer to a CONNECT, for the pipeline.
pub enum Connected {
    /// 2xx: answer the client with `head`, then [`spawn`] the carrier of
    /// `stream`, the tunnel (the proxy's connection); `early` is what the
    /// far end already sent through it (read with the head; empty unless it
    /// speaks first).
    Tunnel {
        head: http::response::Parts,
        stream: UpstreamIo,
        early: Bytes,
    },
    /// Anything else, passed to the client as it is, its body read
    /// (bounded).
    Refused {
        head: http::response::Parts,
        body: Bytes,
    },
}

/// Asks the proxy (the connection's original destination) for the tunnel a
/// CONNECT names, on the agent's connection to it for this client: one
/// proxy connection per client connection, as without Guard, so a proxy
/// that authenticates the connection (NTLM, Negotiate) sees the client's
/// retries where it expects them. Bounded like a connect.
pub async fn connect(
    ctx: &ConnContext,
    tunnel: &TunnelRequest,
) -> Result<Connected, UpstreamFailure> {
    let upstream = ctx.upstream.as_ref().map_err(Clone::clone)?;
    let request = tunnel.request(super::body::full(Bytes::new()))?;
    let exchange = async { answer(upstream.send(request).await?).await };
    tokio::time::timeout(CONNECT_TIMEOUT, exchange)
        .await
        .map_err(|_| UpstreamFailure {
            reason: format!(
                "the proxy did not answer the CONNECT within {}s",
                CONNECT_TIMEOUT.as_secs()
            ),
            tls: false,
        })?
}

/// What the proxy's answer to a CONNECT means: a 2xx hands over the
/// connection (which hyper's client gives back as the stream it was built
/// on, an [`UpstreamIo`] or the TLS to the proxy over one, with whatever it
/// read past the head); anything else is a refusal.
async fn answer(mut resp: Response<Incoming>) -> Result<Connected, UpstreamFailure> {
    let fail = |reason: String| UpstreamFailure { reason, tls: false };
    if !resp.status().is_success() {
        let (head, body) = resp.into_parts();
        let body = Limited::new(body, MAX_REFUSAL_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Ok(Connected::Refused { head, body });
    }
    let upgraded = hyper::upgrade::on(&mut resp)
        .await
        .map_err(|e| fail(format!("the proxy's tunnel failed: {e}")))?;
    // The proxy's connection as the upstream module made it: plain, or
    // TLS to the proxy (then the tunnel travels inside that TLS).
    let (stream, early) = match upgraded.downcast::<TokioIo<UpstreamIo>>() {
        Ok(parts) => (parts.io.into_inner(), parts.read_buf),
        Err(upgraded) => {
            let parts = upgraded
                .downcast::<TokioIo<tokio_rustls::client::TlsStream<UpstreamIo>>>()
                .map_err(|_| fail("the proxy's tunnel is not a stream Guard opened".into()))?;
            let tls = Box::new(parts.io.into_inner());
            (UpstreamIo::ProxyTls(tls), parts.read_buf)
        }
    };
    let (head, _) = resp.into_parts();
    Ok(Connected::Tunnel {
        head,
        stream,
        early,
    })
}

/// Records the CONNECT's event once what its tunnel carries is known: the
/// client's TLS handshake inside it, or the start of a plaintext or opaque
/// session; with the error that ended it there, if any, and the TLS inside
/// it. If the tunnel ends first (the agent stops), the event says so.
pub struct ConnectEvent(Option<RecordConnect>);

/// Records a CONNECT's event: the error that ended its tunnel early, the
/// TLS inside it.
type RecordConnect = Box<dyn FnOnce(Option<String>, Option<TlsRecord>) + Send>;

impl ConnectEvent {
    pub fn new(record: impl FnOnce(Option<String>, Option<TlsRecord>) + Send + 'static) -> Self {
        Self(Some(Box::new(record)))
    }

    fn record(mut self, error: Option<String>, tls: Option<TlsRecord>) {
        if let Some(record) = self.0.take() {
            record(error, tls);
        }
    }
}

impl Drop for ConnectEvent {
    fn drop(&mut self) {
        if let Some(record) = self.0.take() {
            record(
                Some("the tunnel ended before the client spoke in it".into()),
                None,
            );
        }
    }
}

/// Starts carrying an established tunnel: waits for the client's side of
/// the upgrade (hyper hands it over once the answer has gone out), then
/// [`carry`]. Ends when the tunnel does, or when `stopped`'s sender goes.
pub fn spawn(
    ctx: &Arc<ConnContext>,
    tunnel: TunnelRequest,
    client_side: OnUpgrade,
    stream: (UpstreamIo, Bytes),
    event: ConnectEvent,
    mut stopped: tokio::sync::watch::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    let ctx = Arc::clone(ctx);
    tokio::spawn(async move {
        tokio::select! {
            () = carry(ctx, tunnel, client_side, stream, event) => {}
            _ = stopped.changed() => {}
        }
    })
}

/// Carries one tunnel: finds out what the client speaks inside it, then
/// inspects (TLS or plaintext HTTP/1) or copies. Boxed: a request inside
/// the tunnel could be a CONNECT again, and the pipeline serving it calls
/// back here.
fn carry(
    ctx: Arc<ConnContext>,
    tunnel: TunnelRequest,
    client: OnUpgrade,
    up: (UpstreamIo, Bytes),
    event: ConnectEvent,
) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(carry_inner(ctx, tunnel, client, up, event))
}

async fn carry_inner(
    ctx: Arc<ConnContext>,
    tunnel: TunnelRequest,
    client: OnUpgrade,
    (up, early): (UpstreamIo, Bytes),
    event: ConnectEvent,
) {
    let started = Instant::now();
    let mut client = match client.await {
        Ok(c) => TokioIo::new(c),
        Err(e) => {
            event.record(
                Some(format!("the client side of the tunnel failed: {e}")),
                None,
            );
            return;
        }
    };
    if !early.is_empty() {
        // The far end spoke first: not TLS or HTTP. Carried as it is.
        event.record(None, None);
        let mut up = up;
        let carried = async {
            tokio::io::AsyncWriteExt::write_all(&mut client, &early).await?;
            tokio::io::copy_bidirectional(&mut client, &mut up).await
        };
        if let Err(e) = carried.await {
            tracing::debug!(
                target = tunnel.authority.as_str(),
                "a CONNECT tunnel ended with an error: {e}"
            );
        }
        return;
    }
    let (client, sniff) = match sniff(client, &up).await {
        Ok(x) => x,
        Err(e) => {
            event.record(
                Some(format!(
                    "reading from the client inside the tunnel failed: {e}"
                )),
                None,
            );
            return;
        }
    };
    let via = UpstreamVia {
        addr: ctx.dst,
        mark: ctx.mark,
        in_tunnel: true,
    };
    let settings = Arc::clone(&ctx.inspect);
    let host = tunnel.host().to_ascii_lowercase();
    let outcome = match sniff {
        Sniff::Tls(hello)
            if settings.inspect_tls
                && !hello
                    .sni
                    .as_deref()
                    .is_some_and(|s| settings.passthrough.is_match(s)) =>
        {
            let name = hello.sni.clone().unwrap_or_else(|| host.clone());
            let server = rustls::pki_types::ServerName::try_from(name.clone())
                .map_err(|_| crate::tls::upstream::UpstreamError::InvalidServerName(name));
            let leaf_ip = host.parse::<IpAddr>().ok();
            match terminate_tls(&settings, client, up, via, &hello, server, leaf_ip).await {
                Err(TlsFailed::Mint { error, .. }) => {
                    event.record(Some(error.clone()), None);
                    Err(error)
                }
                Err(TlsFailed::Handshake { error, record }) => {
                    event.record(Some(error.clone()), Some(record));
                    Err(error)
                }
                Ok(t) => {
                    event.record(
                        t.upstream.as_ref().err().map(|f| f.reason.clone()),
                        Some(t.record.clone()),
                    );
                    let mut template = ctx.template.clone();
                    template.host = Some(hello.sni.clone().unwrap_or_else(|| host.clone()));
                    template.tls = Some(t.record);
                    if let Err(f) = &t.upstream {
                        template.verdict = Verdict::Error;
                        template.error = Some(f.reason.clone());
                    }
                    let inner = inner_context(
                        &ctx,
                        template,
                        hello.sni.or(Some(host)),
                        "https",
                        t.upstream,
                    );
                    pipeline::serve(t.tls, inner).await
                }
            }
        }
        Sniff::Malformed { reason } => {
            // As on a direct connection: closed, and the event says why.
            event.record(Some(format!("malformed TLS ClientHello: {reason}")), None);
            return;
        }
        Sniff::Http1(_) | Sniff::Http2PriorKnowledge => {
            event.record(None, None);
            let target = UpstreamTarget {
                addr: ctx.dst,
                mark: ctx.mark,
                tls: None,
                alpn: h2_prior_knowledge(&sniff),
                in_tunnel: true,
            };
            let upstream = Upstream::start(target, up).await.map(Arc::new);
            let mut template = ctx.template.clone();
            template.host = Some(host);
            let inner = inner_context(&ctx, template, None, "http", upstream);
            pipeline::serve(client, inner).await
        }
        other => {
            // TLS not looked into (a passthrough name, or inspection off),
            // or not TLS or HTTP at all: carried as it is.
            let tls = match other {
                Sniff::Tls(hello) => Some(TlsRecord {
                    sni: hello.sni,
                    passthrough: true,
                    ..Default::default()
                }),
                _ => None,
            };
            event.record(None, tls);
            let (mut client, mut up) = (client, up);
            tokio::io::copy_bidirectional(&mut client, &mut up)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    if let Err(e) = outcome {
        tracing::debug!(
            target = tunnel.authority.as_str(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "a CONNECT tunnel ended with an error: {e}"
        );
    }
}

/// The pipeline context of the connection inside a tunnel: the outer one's
/// attribution, policy and settings, with the tunnel's own TLS, name and
/// upstream.
fn inner_context(
    outer: &ConnContext,
    template: crate::store::Event,
    sni: Option<String>,
    scheme: &'static str,
    upstream: Result<Arc<Upstream>, UpstreamFailure>,
) -> Arc<ConnContext> {
    let mut facts = outer.facts.clone();
    facts.dest_host = template.host.clone();
    Arc::new(ConnContext {
        template,
        dst: outer.dst,
        sni,
        scheme,
        upstream,
        policy: Arc::clone(&outer.policy),
        inspector: Arc::clone(&outer.inspector),
        sink: outer.sink.clone(),
        facts,
        approvals: Arc::clone(&outer.approvals),
        secrets: Arc::clone(&outer.secrets),
        inspect: Arc::clone(&outer.inspect),
        mark: outer.mark,
    })
}

/// Reads what the client sends first inside the tunnel until [`classify`]
/// can tell what it is (or the upstream speaks first: opaque); returns the
/// client with those bytes put back in front.
async fn sniff<IO>(mut client: IO, up: &UpstreamIo) -> io::Result<(Prefixed<IO>, Sniff)>
where
    IO: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    let sniff = loop {
        let mut chunk = [0u8; 4096];
        let n = tokio::select! {
            r = tokio::time::timeout_at(deadline, client.read(&mut chunk)) => match r {
                Ok(r) => r?,
                Err(_) => break Sniff::Opaque,
            },
            _ = up.readable() => break Sniff::Opaque,
        };
        if n == 0 {
            break Sniff::Opaque;
        }
        buf.extend_from_slice(&chunk[..n]);
        match classify(&buf) {
            Sniff::NeedMore if buf.len() < MAX_SNIFF_BYTES => continue,
            Sniff::NeedMore => break Sniff::Opaque,
            other => break other,
        }
    };
    Ok((
        Prefixed {
            prefix: Bytes::from(buf),
            io: client,
        },
        sniff,
    ))
}

/// A stream whose first bytes were already read: they are read again first.
pub struct Prefixed<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_prefixed_stream_reads_its_prefix_then_the_rest() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b" world")
            .await
            .unwrap();
        drop(a);
        let mut p = Prefixed {
            prefix: Bytes::from_static(b"hello"),
            io: b,
        };
        let mut out = String::new();
        p.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[test]
    fn a_tunnel_request_takes_the_connect_target_and_its_host() {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("api.test:8443")
            .header("proxy-authorization", "Basic eDp5")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let t = TunnelRequest::new(&parts).unwrap();
        assert_eq!(t.authority, "api.test:8443");
        assert_eq!(t.host(), "api.test");
        assert_eq!(t.headers["proxy-authorization"], "Basic eDp5");

        let v6 = Request::builder()
            .method(Method::CONNECT)
            .uri("[::1]:443")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        assert_eq!(TunnelRequest::new(&v6).unwrap().host(), "::1");

        let no_port = Request::builder()
            .method(Method::CONNECT)
            .uri("api.test")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        assert!(TunnelRequest::new(&no_port).is_none());
    }
}
