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
//! a new one (inside a CONNECT tunnel: a new tunnel through the same proxy).
//! HTTP/2 requests are multiplexed on one connection.

use std::{net::SocketAddr, sync::Arc};

use hyper::{body::Incoming, client::conn, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::{net::TcpStream, sync::Mutex};

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
    /// The client's tunnel through an explicit proxy at `addr`: a new
    /// connection to the upstream is a new connection to the proxy and a
    /// CONNECT on it (see [`super::tunnel`]).
    pub tunnel: Option<Arc<super::tunnel::TunnelRequest>>,
}

enum Sender {
    H1(conn::http1::SendRequest<UpBody>),
    H2(conn::http2::SendRequest<UpBody>),
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

async fn handshake(target: &UpstreamTarget, tcp: TcpStream) -> Result<Connected, UpstreamFailure> {
    let fail = |reason: String, tls: bool| UpstreamFailure { reason, tls };
    match &target.tls {
        None => {
            let (sender, conn) = conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| fail(format!("upstream HTTP handshake failed: {e}"), false))?;
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            Ok(Connected {
                sender: Sender::H1(sender),
                alpn: None,
                tls_version: None,
            })
        }
        Some((tls, name)) => {
            let stream = tokio::time::timeout(
                CONNECT_TIMEOUT,
                tls.connect(tcp, name.clone(), &target.alpn),
            )
            .await
            .map_err(|_| fail("upstream TLS handshake timed out".into(), true))?
            .map_err(|e| fail(e.reason(), true))?;
            let (_, session) = stream.get_ref();
            let alpn = session
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned());
            let tls_version = session.protocol_version().map(|v| format!("{v:?}"));
            let sender = if alpn.as_deref() == Some("h2") {
                let (sender, conn) =
                    conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                        .await
                        .map_err(|e| {
                            fail(format!("upstream HTTP/2 handshake failed: {e}"), false)
                        })?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Sender::H2(sender)
            } else {
                let (sender, conn) = conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| fail(format!("upstream HTTP handshake failed: {e}"), false))?;
                tokio::spawn(async move {
                    let _ = conn.with_upgrades().await;
                });
                Sender::H1(sender)
            };
            Ok(Connected {
                sender,
                alpn,
                tls_version,
            })
        }
    }
}

impl Upstream {
    /// Sets up the first upstream connection over an already connected
    /// TCP stream (TLS handshake included).
    pub async fn start(target: UpstreamTarget, tcp: TcpStream) -> Result<Self, UpstreamFailure> {
        let c = handshake(&target, tcp).await?;
        Ok(Self {
            target,
            sender: Mutex::new(Some(c.sender)),
            alpn: c.alpn,
            tls_version: c.tls_version,
        })
    }

    async fn reconnect(&self) -> Result<Sender, UpstreamFailure> {
        let mut tcp = connect_tcp(self.target.addr, self.target.mark)
            .await
            .map_err(|e| UpstreamFailure {
                reason: describe_connect_error(&e),
                tls: false,
            })?;
        if let Some(tunnel) = &self.target.tunnel {
            tcp = tunnel.reopen(tcp).await?;
        }
        Ok(handshake(&self.target, tcp).await?.sender)
    }

    /// Sends one request and returns the upstream's response head and body.
    pub async fn send(&self, req: Request<UpBody>) -> Result<Response<Incoming>, UpstreamFailure> {
        let upstream_err = |e: hyper::Error| UpstreamFailure {
            reason: format!("upstream request failed: {e}"),
            tls: false,
        };
        let mut slot = self.sender.lock().await;
        let usable = match slot.as_mut() {
            Some(Sender::H1(s)) => s.ready().await.is_ok(),
            Some(Sender::H2(s)) => s.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            *slot = Some(self.reconnect().await?);
        }
        match slot.as_mut().expect("connected above") {
            Sender::H2(s) => {
                let mut s = s.clone();
                drop(slot);
                s.send_request(req).await.map_err(upstream_err)
            }
            Sender::H1(s) => {
                // HTTP/1.1: the client sends one request at a time on this
                // connection, so holding the slot until the head arrives
                // keeps requests in order.
                s.send_request(req).await.map_err(upstream_err)
            }
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
