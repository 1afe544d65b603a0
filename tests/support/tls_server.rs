//! A TLS test server standing in for an external HTTPS service: a test CA
//! (rcgen), server certificates for names like `api.test` and the IPs the
//! servers bind (valid, expired, or for the wrong name), and a hyper server
//! on tokio-rustls speaking HTTP/1.1 and HTTP/2 (ALPN).
//!
//! Endpoints, on any path:
//! - `/download?bytes=N`: N bytes of [`pattern_block`](crate::servers::pattern_block)
//!   repeated, streamed;
//! - `/ws` with `Upgrade: websocket`: a WebSocket echo (text and binary
//!   frames come back unmasked, a close frame is answered and ends it);
//! - paths starting `/close`: as below, then (HTTP/1.1) the server closes
//!   the connection (`Connection: close`);
//! - paths starting `/drop`: as below, then the server closes the
//!   connection without saying so first (as an idle timeout does);
//! - anything else: the request body is streamed through SHA-256 and the
//!   answer is a JSON object with `method`, `path`, `query`, `version`,
//!   `host`, `alpn`, `body_len`, `body_sha256`.
//!
//! Servers run in the test process (outside every monitored cgroup), on one
//! shared tokio runtime, and bind only 127.0.0.0/8 or ::1.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    body::{Body, Frame, Incoming},
    header, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::servers::pattern_block;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tls-test-server")
            .enable_all()
            .build()
            .expect("tokio runtime for test servers")
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A test certificate authority; its certificate is also written to a PEM
/// file (for `guard-agent run --upstream-root` and `curl --cacert`).
pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    pub cert_pem: String,
    pem_file: tempfile::NamedTempFile,
}

/// What kind of server certificate to issue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertKind {
    /// Valid now, for the names asked for.
    Valid,
    /// For the names asked for, but expired (2020–2021).
    Expired,
    /// Valid now, but only for `wrong-name.test`.
    WrongName,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    pub fn new() -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Guard e2e test CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-signed CA");
        let cert_pem = cert.pem();
        let mut pem_file = tempfile::Builder::new()
            .prefix("guard-test-ca-")
            .suffix(".pem")
            .tempfile()
            .expect("CA PEM file");
        std::io::Write::write_all(&mut pem_file, cert_pem.as_bytes()).expect("write CA PEM");
        Self {
            params,
            key,
            cert_pem,
            pem_file,
        }
    }

    /// The CA certificate as a PEM file.
    pub fn pem_path(&self) -> &Path {
        self.pem_file.path()
    }

    /// A server certificate (chain of one) and its key.
    pub fn issue(
        &self,
        names: &[&str],
        kind: CertKind,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let (cert, key) = self.leaf(names, kind);
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    /// A valid server certificate for `names` and its key, both PEM (for a
    /// server in another process).
    pub fn issue_pem(&self, names: &[&str]) -> (String, String) {
        let (cert, key) = self.leaf(names, CertKind::Valid);
        (cert.pem(), key.serialize_pem())
    }

    fn leaf(&self, names: &[&str], kind: CertKind) -> (rcgen::Certificate, KeyPair) {
        let names: Vec<String> = match kind {
            CertKind::WrongName => vec!["wrong-name.test".into()],
            _ => names.iter().map(|s| s.to_string()).collect(),
        };
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names[0].as_str());
        params.distinguished_name = dn;
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        if kind == CertKind::Expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        } else {
            params.not_before = now - time::Duration::days(1);
            params.not_after = now + time::Duration::days(30);
        }
        let key = KeyPair::generate().expect("leaf key");
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("sign leaf");
        (cert, key)
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct SeenHttps {
    pub method: String,
    pub path: String,
    pub version: String,
    pub host: Option<String>,
    /// ALPN of the connection it came on ("h2", "http/1.1"), TLS only.
    pub alpn: Option<String>,
    pub body_len: u64,
    pub body_sha256: String,
    /// Request headers, names lower-case, in order.
    pub headers: Vec<(String, String)>,
}

struct State {
    seen: Mutex<Vec<SeenHttps>>,
    connections: AtomicUsize,
}

/// The test HTTPS (or plain HTTP) server.
pub struct TlsServer {
    pub addr: SocketAddr,
    state: Arc<State>,
}

/// Names every valid test server certificate covers.
pub const TEST_NAMES: &[&str] = &["api.test", "*.pinned.test", "localhost", "127.0.0.2", "::1"];

impl TlsServer {
    /// An HTTPS server with a certificate of `kind` from `ca` for
    /// [`TEST_NAMES`], offering ALPN h2 and http/1.1.
    pub fn start(bind: SocketAddr, ca: &TestCa, kind: CertKind) -> Self {
        Self::start_with_cert(bind, ca.issue(TEST_NAMES, kind))
    }

    /// An HTTPS server with a valid certificate from `ca` for `names`.
    pub fn start_for_names(bind: SocketAddr, ca: &TestCa, names: &[&str]) -> Self {
        Self::start_with_cert(bind, ca.issue(names, CertKind::Valid))
    }

    fn start_with_cert(bind: SocketAddr, cert: IssuedCert) -> Self {
        Self::spawn(bind, Some(acceptor(cert, &[b"h2", b"http/1.1"])))
    }

    /// The same server in plaintext (HTTP/1.1, or h2c with prior knowledge).
    pub fn start_plain(bind: SocketAddr) -> Self {
        Self::spawn(bind, None)
    }

    fn spawn(bind: SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let (addr, listener) = listen(bind);
        let state = Arc::new(State {
            seen: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
        });
        let st = Arc::clone(&state);
        runtime().spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                st.connections.fetch_add(1, Ordering::Relaxed);
                // As real servers do: no Nagle delay on small writes (a TLS
                // handshake flight or a short response).
                let _ = tcp.set_nodelay(true);
                let st = Arc::clone(&st);
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let alpn = stream
                                .get_ref()
                                .1
                                .alpn_protocol()
                                .map(|p| String::from_utf8_lossy(p).into_owned());
                            serve_conn(stream, st, alpn).await;
                        }
                        None => serve_conn(tcp, st, None).await,
                    }
                });
            }
        });
        Self { addr, state }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Requests seen so far.
    pub fn requests(&self) -> Vec<SeenHttps> {
        self.state.seen.lock().unwrap().clone()
    }

    /// The values of header `name` (lower case) on the first request the
    /// server saw for `path`; panics when it saw none.
    pub fn header_values(&self, path: &str, name: &str) -> Vec<String> {
        let seen = self.requests();
        let r = seen
            .iter()
            .find(|r| r.path == path)
            .unwrap_or_else(|| panic!("no {path}: {seen:#?}"));
        r.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::Relaxed)
    }
}

/// A TLS front for a plaintext service: what an `https://` proxy URL
/// reaches. It terminates TLS with a certificate from the test CA for
/// [`TEST_NAMES`] (ALPN http/1.1) and carries the plaintext both ways to
/// `backend` (say a [`ConnectProxy`](crate::servers::ConnectProxy), which
/// then is a proxy spoken to over TLS).
pub struct TlsFront {
    pub addr: SocketAddr,
}

impl TlsFront {
    pub fn start(bind: SocketAddr, ca: &TestCa, backend: SocketAddr) -> Self {
        assert!(
            backend.ip().is_loopback(),
            "test servers talk only to loopback"
        );
        let acceptor = acceptor(ca.issue(TEST_NAMES, CertKind::Valid), &[b"http/1.1"]);
        let (addr, listener) = listen(bind);
        runtime().spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Self { addr }
    }
}

/// A certificate chain and its key, as [`TestCa::issue`] makes them.
type IssuedCert = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// A TLS acceptor presenting `cert`, offering `alpn`.
fn acceptor((chain, key): IssuedCert, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server certificate");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A listener on the test runtime, bound to `bind` (loopback only).
fn listen(bind: SocketAddr) -> (SocketAddr, tokio::net::TcpListener) {
    assert!(
        bind.ip().is_loopback(),
        "test servers bind only to loopback"
    );
    let std_listener = std::net::TcpListener::bind(bind).expect("bind a test server");
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let _guard = runtime().enter();
    (
        addr,
        tokio::net::TcpListener::from_std(std_listener).unwrap(),
    )
}

async fn serve_conn<IO>(io: IO, st: Arc<State>, alpn: Option<String>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let dropping = Arc::new(tokio::sync::Notify::new());
    let drop_after = Arc::clone(&dropping);
    let svc = hyper::service::service_fn(move |req| {
        let st = Arc::clone(&st);
        let alpn = alpn.clone();
        let drop_after = Arc::clone(&drop_after);
        async move {
            let dropping = req.uri().path().starts_with("/drop");
            let resp = handle(req, st, alpn).await;
            if dropping {
                drop_after.notify_one();
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = dropping.notified() => {
            // Keep-alive off while the response is in flight: hyper sends
            // it with no `Connection: close`, then closes.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

type RespBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_owned())
    })
}

async fn handle(
    req: Request<Incoming>,
    st: Arc<State>,
    alpn: Option<String>,
) -> Response<RespBody> {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let version = format!("{:?}", req.version());
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let host = req.uri().authority().map(|a| a.to_string()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
    });

    if path == "/ws" {
        return websocket(req);
    }

    let mut body = req.into_body();
    let mut h = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .body(full("body read failed"))
                .unwrap();
        };
        if let Some(d) = frame.data_ref() {
            h.update(d);
            len += d.len() as u64;
        }
    }
    let sha = hex(&h.finalize());
    st.seen.lock().unwrap().push(SeenHttps {
        method: method.clone(),
        path: path.clone(),
        version: version.clone(),
        host: host.clone(),
        alpn: alpn.clone(),
        headers,
        body_len: len,
        body_sha256: sha.clone(),
    });

    if path == "/download" {
        let n: u64 = query_param(query.as_deref(), "bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, n)
            .body(PatternBody::new(n).boxed())
            .unwrap();
    }

    let json = serde_json::json!({
        "method": method,
        "path": path,
        "query": query,
        "version": version,
        "host": host,
        "alpn": alpn,
        "body_len": len,
        "body_sha256": sha,
    });
    let bytes = serde_json::to_vec(&json).unwrap();
    let mut resp = Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, bytes.len())
        .header("x-test-server", "tls");
    if path.starts_with("/close") {
        // HTTP/1.1: this connection ends after the response.
        resp = resp.header(header::CONNECTION, "close");
    }
    resp.body(full(bytes)).unwrap()
}

/// Streams `len` bytes of the repeated pattern block, 1 MiB per frame.
struct PatternBody {
    block: Bytes,
    left: u64,
}

impl PatternBody {
    fn new(len: u64) -> Self {
        Self {
            block: Bytes::from(pattern_block()),
            left: len,
        }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.block.len() as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.block.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

// ---- WebSocket echo --------------------------------------------------------

const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn websocket_accept(key: &str) -> String {
    use sha1::Digest as _;
    let mut h = sha1::Sha1::new();
    h.update(key.as_bytes());
    h.update(WS_GUID.as_bytes());
    base64(&h.finalize())
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn websocket(mut req: Request<Incoming>) -> Response<RespBody> {
    let is_ws = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = req
        .headers()
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (true, Some(key)) = (is_ws, key) else {
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(full("websocket upgrade expected"))
            .unwrap();
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(up) = on_upgrade.await {
            let _ = ws_echo(TokioIo::new(up)).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header("sec-websocket-accept", websocket_accept(&key))
        .body(full(Bytes::new()))
        .unwrap()
}

/// Echoes WebSocket frames (unmasking the client's) until a close frame.
async fn ws_echo<IO>(mut io: IO) -> std::io::Result<()>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let mut head = [0u8; 2];
        io.read_exact(&mut head).await?;
        let opcode = head[0] & 0x0f;
        let masked = head[1] & 0x80 != 0;
        let mut len = u64::from(head[1] & 0x7f);
        if len == 126 {
            let mut b = [0u8; 2];
            io.read_exact(&mut b).await?;
            len = u64::from(u16::from_be_bytes(b));
        } else if len == 127 {
            let mut b = [0u8; 8];
            io.read_exact(&mut b).await?;
            len = u64::from_be_bytes(b);
        }
        let mut mask = [0u8; 4];
        if masked {
            io.read_exact(&mut mask).await?;
        }
        let mut payload = vec![0u8; len as usize];
        io.read_exact(&mut payload).await?;
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        let mut out = vec![0x80 | opcode];
        if payload.len() < 126 {
            out.push(payload.len() as u8);
        } else if payload.len() <= 0xffff {
            out.push(126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        } else {
            out.push(127);
            out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        out.extend_from_slice(&payload);
        io.write_all(&out).await?;
        io.flush().await?;
        if opcode == 8 {
            return Ok(());
        }
    }
}
