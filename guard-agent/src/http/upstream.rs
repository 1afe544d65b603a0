//! The upstream side of an inspected connection: one connection to the
//! original destination per client connection (TLS with the client's SNI
//! when the client spoke TLS), and a hyper client on it speaking the
//! protocol the upstream chose.
//!
//! The upstream TLS handshake happens before the client's: the agent offers
//! the upstream exactly the ALPN list the client offered, then offers the
//! client only what the upstream picked, so both sides speak the same HTTP
//! version and no translation is needed. Upstream certificate problems are
//! never hidden: they surface as [`UpstreamFailure`] for a 502.
//!
//! Requests on HTTP/1.1 are sent one at a time, as the client sends them;
//! when the upstream closes a keep-alive connection, the next request opens
//! a new one. A request that the closing connection never wrote (it closed
//! between the request being queued and written, which hyper reports by
//! handing the request back) is sent once more on a new connection.
//! HTTP/2 requests are multiplexed on one connection.
//!
//! Inside a CONNECT tunnel there is no new connection: the tunnel belongs
//! to the client's connection to the proxy, which may have authenticated
//! it (NTLM, Negotiate). When it closes, [`SendError::TunnelClosed`] tells
//! the pipeline to close the client's connection, as the proxy would have,
//! so that the client opens and authenticates a tunnel of its own.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use hyper::{body::Incoming, client::conn, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::Mutex,
};

use crate::{
    intercept::connect::{connect_tcp, describe_connect_error, CONNECT_TIMEOUT},
    tls::upstream::UpstreamTls,
};

/// The body type the agent sends upstream.
pub type UpBody = super::body::PipeBody;

/// Why the upstream could not be reached or spoken to.
#[derive(Debug, Clone)]
pub struct UpstreamFailure {
    /// A readable reason: "certificate has expired", "upstream refused the
    /// connection (ECONNREFUSED)", ...
    pub reason: String,
    /// True for TLS certificate and handshake problems.
    pub tls: bool,
}

/// How to reach the original destination.
#[derive(Clone)]
pub struct UpstreamTarget {
    pub addr: SocketAddr,
    pub mark: u32,
    /// TLS settings and the name to verify; None for plaintext.
    pub tls: Option<(Arc<UpstreamTls>, ServerName<'static>)>,
    /// ALPN to offer the upstream (the client's list).
    pub alpn: Vec<String>,
    /// The connection is a tunnel through an explicit proxy at `addr` (see
    /// [`super::tunnel`]): it is never replaced by a new one.
    pub in_tunnel: bool,
}

/// Why a request was not answered by the upstream.
#[derive(Debug)]
pub enum SendError {
    /// The upstream failed: the client gets a 502 naming the problem.
    Failed(UpstreamFailure),
    /// The tunnel through the proxy closed before the server answered (as
    /// a rule, before the request was written): the client's connection
    /// ends, and the client retries on a tunnel of its own.
    TunnelClosed,
}

impl From<SendError> for UpstreamFailure {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Failed(f) => f,
            SendError::TunnelClosed => UpstreamFailure {
                reason: "the tunnel through the proxy closed".into(),
                tls: false,
            },
        }
    }
}

enum Sender {
    H1(conn::http1::SendRequest<UpBody>),
    H2(conn::http2::SendRequest<UpBody>),
}

/// The byte stream an upstream connection runs on: TCP to the original
/// destination (or to a plaintext proxy, a tunnel on it), or a tunnel
/// inside the TLS a client spoke to its proxy (an `https://` proxy URL).
pub enum UpstreamIo {
    Tcp(TcpStream),
    /// A CONNECT tunnel through a proxy reached over TLS: the proxy's TLS
    /// stream, on which the tunnel's bytes travel.
    ProxyTls(Box<tokio_rustls::client::TlsStream<UpstreamIo>>),
}

impl UpstreamIo {
    /// The TCP connection underneath.
    fn tcp(&self) -> &TcpStream {
        match self {
            UpstreamIo::Tcp(s) => s,
            UpstreamIo::ProxyTls(s) => s.get_ref().0.tcp(),
        }
    }

    /// Resolves when the far end has sent something (a server that speaks
    /// first). Through a TLS proxy this is the TCP connection's readiness:
    /// bytes the TLS layer already holds are not seen.
    pub async fn readable(&self) -> io::Result<()> {
        self.tcp().readable().await
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::ProxyTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::ProxyTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::ProxyTls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Tcp(s) => s.is_write_vectored(),
            UpstreamIo::ProxyTls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::ProxyTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::ProxyTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A lazily (re)connected upstream.
pub struct Upstream {
    target: UpstreamTarget,
    sender: Mutex<Option<Sender>>,
    /// Protocol the upstream negotiated: "h2", "http/1.1" or none.
    pub alpn: Option<String>,
    /// TLS version with the upstream, e.g. "TLSv1_3".
    pub tls_version: Option<String>,
}

struct Connected {
    sender: Sender,
    alpn: Option<String>,
    tls_version: Option<String>,
}

async fn handshake(target: &UpstreamTarget, io: UpstreamIo) -> Result<Connected, UpstreamFailure> {
    let Some((tls, name)) = &target.tls else {
        // Plaintext: HTTP/2 when the client spoke it with prior knowledge.
        let h2 = target.alpn.iter().any(|p| p == "h2");
        return Ok(Connected {
            sender: http_over(io, h2).await?,
            alpn: None,
            tls_version: None,
        });
    };
    let fail = |reason: String| UpstreamFailure { reason, tls: true };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(io, name.clone(), &target.alpn))
        .await
        .map_err(|_| fail("upstream TLS handshake timed out".into()))?
        .map_err(|e| fail(e.reason()))?;
    let (_, session) = stream.get_ref();
    let alpn = session
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let tls_version = session.protocol_version().map(|v| format!("{v:?}"));
    let h2 = alpn.as_deref() == Some("h2");
    Ok(Connected {
        sender: http_over(stream, h2).await?,
        alpn,
        tls_version,
    })
}

/// A hyper client connection over `io`, HTTP/2 or HTTP/1.1, its
/// connection task spawned.
async fn http_over<IO>(io: IO, h2: bool) -> Result<Sender, UpstreamFailure>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let fail = |reason: String| UpstreamFailure { reason, tls: false };
    if h2 {
        let (sender, conn) = conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .map_err(|e| fail(format!("upstream HTTP/2 handshake failed: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| fail(format!("upstream HTTP handshake failed: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(Sender::H1(sender))
    }
}

impl Upstream {
    /// Sets up the first upstream connection over an already connected
    /// stream (TCP, or a tunnel through a proxy), TLS handshake included.
    pub async fn start(target: UpstreamTarget, io: UpstreamIo) -> Result<Self, UpstreamFailure> {
        let c = handshake(&target, io).await?;
        Ok(Self {
            target,
            sender: Mutex::new(Some(c.sender)),
            alpn: c.alpn,
            tls_version: c.tls_version,
        })
    }

    async fn reconnect(&self) -> Result<Sender, UpstreamFailure> {
        let tcp = connect_tcp(self.target.addr, self.target.mark)
            .await
            .map_err(|e| UpstreamFailure {
                reason: describe_connect_error(&e),
                tls: false,
            })?;
        Ok(handshake(&self.target, UpstreamIo::Tcp(tcp)).await?.sender)
    }

    /// True when this upstream is a tunnel through a proxy.
    pub fn in_tunnel(&self) -> bool {
        self.target.in_tunnel
    }

    /// Sends one request and returns the upstream's response head and body.
    pub async fn send(&self, req: Request<UpBody>) -> Result<Response<Incoming>, SendError> {
        match self.try_send(req).await? {
            Ok(resp) => Ok(resp),
            // The connection closed before writing it: a new connection
            // (the old one now fails its readiness check), once.
            Err(req) => match self.try_send(req).await? {
                Ok(resp) => Ok(resp),
                Err(_) => Err(SendError::Failed(UpstreamFailure {
                    reason: "the upstream closed two connections before the request could be sent"
                        .into(),
                    tls: false,
                })),
            },
        }
    }

    /// One attempt on the current connection (or a new one if it is
    /// closed); `Ok(Err(req))` when the connection closed before `req` was
    /// written.
    async fn try_send(
        &self,
        req: Request<UpBody>,
    ) -> Result<Result<Response<Incoming>, Request<UpBody>>, SendError> {
        let mut slot = self.sender.lock().await;
        let usable = match slot.as_mut() {
            Some(Sender::H1(s)) => s.ready().await.is_ok(),
            Some(Sender::H2(s)) => s.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            if self.target.in_tunnel {
                return Err(SendError::TunnelClosed);
            }
            *slot = Some(self.reconnect().await.map_err(SendError::Failed)?);
        }
        let sent = match slot.as_mut().expect("connected above") {
            Sender::H2(s) => {
                let mut s = s.clone();
                drop(slot);
                s.try_send_request(req).await
            }
            // HTTP/1.1: the client sends one request at a time on this
            // connection, so holding the slot until the head arrives keeps
            // requests in order.
            Sender::H1(s) => s.try_send_request(req).await,
        };
        match sent {
            Ok(resp) => Ok(Ok(resp)),
            Err(mut e) => match e.take_message() {
                Some(_) if self.target.in_tunnel => Err(SendError::TunnelClosed),
                Some(req) => Ok(Err(req)),
                // A tunnel that closed without a byte of answer (it closed
                // as the request went out) ended like a closed one.
                None if self.target.in_tunnel && e.error().is_incomplete_message() => {
                    Err(SendError::TunnelClosed)
                }
                None => Err(SendError::Failed(UpstreamFailure {
                    reason: format!("upstream request failed: {}", e.into_error()),
                    tls: false,
                })),
            },
        }
    }

    /// True when requests must use origin-form URIs (HTTP/1.1 upstream).
    pub async fn is_http1(&self) -> bool {
        matches!(
            self.sender.lock().await.as_ref(),
            Some(Sender::H1(_)) | None
        )
    }
}
