//! The HTTPS bench's reference relay: the least a TLS-terminating relay can
//! do, measured in the same run as direct and Guard, so that the report
//! shows how much of Guard's cost per request is terminating and
//! re-originating TLS on this machine (a second loopback TCP connection,
//! a third process to wake, every record decrypted and encrypted once
//! more) and how much is Guard's HTTP pipeline, inspection and records.
//!
//! It runs as its own process (`xtask bench-tls-relay`, outside every
//! monitored cgroup), as the agent does: it binds `127.0.0.2:0`, prints the
//! address it listens on, and serves until killed. Each connection: a TLS
//! handshake with the client (one fixed certificate, ALPN http/1.1) while
//! it connects to `--to` and handshakes there (TLS session resumption on,
//! as Guard keeps sessions to upstreams), then plaintext copied both ways
//! with tokio's `copy_bidirectional`. No HTTP parsing, no certificate
//! minting, no SNI to read, no lookups, no records: a reverse proxy that
//! knows its one upstream. With `--http` ([`RelayLevel::Http`]) it parses
//! instead: hyper's HTTP/1.1 server on the client's leg, hyper's client on
//! the upstream's, each request and response handed across untouched, the
//! floor of a relay that reads requests with hyper, as Guard does. It must
//! never be used for anything but the bench: it only connects to
//! 127.0.0.0/8.

use std::{
    io::{self, Write},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{bail, Context};
use rustls::{
    pki_types::{pem::PemObject, PrivateKeyDer, ServerName},
    ServerConfig,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::{
    bench_https::{http1_client_config, pem_certs},
    bench_relay::Relay,
};

/// Options of the hidden `bench-tls-relay` subcommand.
#[derive(clap::Args)]
pub struct TlsRelayArgs {
    /// Where every accepted connection is carried to; must be in 127.0.0.0/8.
    #[arg(long)]
    to: SocketAddr,
    /// The certificate the relay presents to clients (PEM, a chain).
    #[arg(long)]
    cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// The CA the upstream's certificate must chain to (PEM).
    #[arg(long)]
    upstream_ca: PathBuf,
    /// The name the upstream's certificate is checked against (SNI).
    #[arg(long)]
    upstream_name: String,
    /// Relay HTTP/1.1 requests with hyper on both legs (a server connection
    /// to the client, a client connection to the upstream, each request
    /// handed from one to the other with its body streamed) instead of
    /// copying bytes.
    #[arg(long)]
    http: bool,
}

/// `xtask bench-tls-relay`: listens, prints the address, relays until
/// killed.
pub fn main(a: TlsRelayArgs) -> anyhow::Result<()> {
    match a.to.ip() {
        IpAddr::V4(ip) if ip.octets()[0] == 127 => {}
        other => bail!("bench-tls-relay only connects to 127.0.0.0/8, not {other}"),
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(serve(a))
}

/// Starts `exe bench-tls-relay` in front of `to`, presenting `cert_key`
/// (PEM files) and checking the upstream against `upstream_ca` for
/// `upstream_name`; waits for its address.
pub fn start(
    exe: &Path,
    to: SocketAddr,
    (cert, key): (&Path, &Path),
    upstream_ca: &Path,
    upstream_name: &str,
    level: RelayLevel,
) -> anyhow::Result<Relay> {
    let path = |p: &Path| p.display().to_string();
    let mut args: Vec<String> = Vec::new();
    if level == RelayLevel::Http {
        args.push("--http".into());
    }
    Relay::spawn(
        exe,
        &[
            "bench-tls-relay".into(),
            "--to".into(),
            to.to_string(),
            "--cert".into(),
            path(cert),
            "--key".into(),
            path(key),
            "--upstream-ca".into(),
            path(upstream_ca),
            "--upstream-name".into(),
            upstream_name.into(),
        ]
        .into_iter()
        .chain(args)
        .collect::<Vec<_>>(),
    )
}

/// What the reference relay relays.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RelayLevel {
    /// Plaintext bytes, copied both ways.
    Bytes,
    /// HTTP/1.1 requests and responses, through hyper on both legs.
    Http,
}

async fn serve(a: TlsRelayArgs) -> anyhow::Result<()> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = PrivateKeyDer::from_pem_file(&a.key)
        .with_context(|| format!("read the key {}", a.key.display()))?;
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(pem_certs(&a.cert)?, key)?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let connector = TlsConnector::from(Arc::new(http1_client_config(&a.upstream_ca)?));
    let name = ServerName::try_from(a.upstream_name.clone())?;

    let l = TcpListener::bind("127.0.0.2:0")
        .await
        .context("bind the relay on 127.0.0.2")?;
    println!("{}", l.local_addr()?);
    io::stdout().flush()?;
    loop {
        let (c, _) = l.accept().await?;
        let (acceptor, connector, name) = (acceptor.clone(), connector.clone(), name.clone());
        let http = a.http;
        tokio::spawn(async move {
            // A failed connection is the client's to notice.
            let _ = carry(c, a.to, acceptor, connector, name, http).await;
        });
    }
}

/// Terminates the client's TLS, originates TLS to `to`, then copies
/// plaintext both ways until both directions end, or (`http`) relays
/// HTTP/1.1 requests until the client closes.
async fn carry(
    c: TcpStream,
    to: SocketAddr,
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    name: ServerName<'static>,
    http: bool,
) -> anyhow::Result<()> {
    c.set_nodelay(true)?;
    let upstream = async {
        let u = TcpStream::connect(to).await?;
        u.set_nodelay(true)?;
        connector.connect(name, u).await
    };
    let (mut client, mut upstream) = tokio::try_join!(acceptor.accept(c), upstream)?;
    if http {
        return relay_http(client, upstream).await;
    }
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// hyper's HTTP/1.1 server on the client's leg, its client on the
/// upstream's: each request goes upstream as it came (head and streamed
/// body), each response back as it came. Nothing is read, changed or
/// recorded: the least an HTTP-aware relay built on hyper does.
async fn relay_http<C, U>(client: C, upstream: U) -> anyhow::Result<()>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper::{body::Incoming, Request};
    use hyper_util::rt::TokioIo;

    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await?;
    tokio::spawn(conn);
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let sender = Arc::clone(&sender);
        async move {
            let mut sender = sender.lock().await;
            sender.ready().await?;
            sender.send_request(req).await
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .await?;
    Ok(())
}
