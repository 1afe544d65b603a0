//! TLS from the agent to the original destination of an intercepted
//! connection.
//!
//! [`UpstreamTls`] holds the trust anchors (the system roots plus extra PEM
//! files from configuration, see [`RootSources`]) and builds a rustls
//! `ClientConfig` per ALPN list, sending the SNI the client sent (or none,
//! when the client connected to a bare IP address: see [`server_name`]).
//!
//! Failures become a short human-readable reason ([`describe_tls_error`],
//! [`describe_io_error`]), e.g. "certificate has expired" or "unknown issuer
//! (self-signed or untrusted CA)", which the HTTP layer puts in its 502 body
//! and the event store records.
//!
//! Invariants:
//! - Certificates are always verified against the configured roots with
//!   rustls' WebPKI verifier. There is no option to skip verification, and no
//!   failure is ever turned into a pass: it is an [`UpstreamError`].
//! - The Guard CA can be excluded from the roots ([`RootSources::exclude`]),
//!   so the agent never trusts certificates it could have minted itself, even
//!   after the CA was installed into the system store.

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;

/// Why upstream TLS could not be set up or completed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot read extra root certificate file {path}: {source}")]
    ReadRoots {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("extra root certificate file {path} holds no PEM certificate")]
    NoCertificatesInFile { path: PathBuf },
    #[error("extra root certificate file {path}: {reason}")]
    BadRootFile { path: PathBuf, reason: String },
    #[error("no trusted root certificates: the system store is empty or disabled and no extra roots are configured")]
    NoRoots,
    #[error("{0:?} is not a valid upstream server name")]
    InvalidServerName(String),
    #[error("cannot build the upstream TLS configuration: {0}")]
    Config(String),
    #[error("TLS to {server} failed: {reason}")]
    Handshake {
        server: String,
        /// A readable reason, for a 502 body or an event.
        reason: String,
        #[source]
        source: io::Error,
    },
}

impl UpstreamError {
    /// The readable reason of a handshake failure, or the error's message.
    pub fn reason(&self) -> String {
        match self {
            Self::Handshake { reason, .. } => reason.clone(),
            other => other.to_string(),
        }
    }
}

/// Where upstream trust anchors come from.
#[derive(Debug, Clone)]
pub struct RootSources {
    /// Load the system's roots (through `rustls-native-certs`, which honours
    /// `SSL_CERT_FILE` and `SSL_CERT_DIR`).
    pub system: bool,
    /// Extra PEM files, each holding one or more CA certificates.
    pub extra_pem_files: Vec<PathBuf>,
    /// Certificates never to trust, whatever the sources say (the Guard CA).
    pub exclude: Vec<CertificateDer<'static>>,
}

impl Default for RootSources {
    fn default() -> Self {
        Self {
            system: true,
            extra_pem_files: Vec::new(),
            exclude: Vec::new(),
        }
    }
}

/// A loaded root store and where its anchors came from.
#[derive(Debug, Clone)]
pub struct LoadedRoots {
    pub store: Arc<RootCertStore>,
    /// Anchors added from the system store.
    pub system: usize,
    /// Anchors added from extra PEM files.
    pub extra: usize,
    /// System certificates skipped: unparsable or excluded.
    pub skipped: usize,
}

/// Builds the root store described by `sources`.
pub fn load_roots(sources: &RootSources) -> Result<LoadedRoots, UpstreamError> {
    let mut store = RootCertStore::empty();
    let excluded = |cert: &CertificateDer<'_>| sources.exclude.iter().any(|e| e == cert);
    let mut loaded = (0, 0, 0);

    if sources.system {
        let native = rustls_native_certs::load_native_certs();
        for err in &native.errors {
            tracing::warn!(error = %err, "problem loading system root certificates");
        }
        let before = native.certs.len();
        let certs: Vec<_> = native.certs.into_iter().filter(|c| !excluded(c)).collect();
        let (added, unparsable) = store.add_parsable_certificates(certs);
        loaded.0 = added;
        loaded.2 = unparsable + (before - added - unparsable);
    }

    for path in &sources.extra_pem_files {
        let pem = std::fs::read(path).map_err(|source| UpstreamError::ReadRoots {
            path: path.clone(),
            source,
        })?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| UpstreamError::BadRootFile {
                path: path.clone(),
                reason: format!("invalid PEM: {e}"),
            })?;
        if certs.is_empty() {
            return Err(UpstreamError::NoCertificatesInFile { path: path.clone() });
        }
        for (index, cert) in certs.into_iter().enumerate() {
            if excluded(&cert) {
                continue;
            }
            store.add(cert).map_err(|e| UpstreamError::BadRootFile {
                path: path.clone(),
                reason: format!(
                    "certificate #{} is not a usable trust anchor: {e}",
                    index + 1
                ),
            })?;
            loaded.1 += 1;
        }
    }

    if store.is_empty() {
        return Err(UpstreamError::NoRoots);
    }
    Ok(LoadedRoots {
        store: Arc::new(store),
        system: loaded.0,
        extra: loaded.1,
        skipped: loaded.2,
    })
}

/// The name to verify the upstream certificate against, and to send as SNI:
/// the client's SNI if it sent one, else the original destination address
/// (no SNI is sent for an address, as the client did not send one either).
pub fn server_name(
    sni: Option<&str>,
    original_dst: IpAddr,
) -> Result<ServerName<'static>, UpstreamError> {
    match sni {
        Some(sni) => ServerName::try_from(sni.to_string())
            .map_err(|_| UpstreamError::InvalidServerName(sni.to_string())),
        None => Ok(ServerName::IpAddress(original_dst.into())),
    }
}

/// Upstream TLS settings shared by all connections.
///
/// Every connection's `ClientConfig` is a copy of one base configuration:
/// rustls resumes a session only under the very verifier and client
/// credentials (the same `Arc`s) that made it, so a configuration built
/// afresh per connection would never resume and would verify the upstream's
/// certificate chain on every connection.
#[derive(Clone)]
pub struct UpstreamTls {
    base: ClientConfig,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls").finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// Upstream TLS trusting exactly `roots`.
    pub fn new(roots: Arc<RootCertStore>) -> Result<Self, UpstreamError> {
        let provider = Arc::new(prefer_sha256_suite(&super::crypto_provider()));
        let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| UpstreamError::Config(e.to_string()))?;
        let mut base = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| UpstreamError::Config(e.to_string()))?
            .with_webpki_verifier(verifier)
            .with_no_client_auth();
        base.resumption = Resumption::in_memory_sessions(1024);
        Ok(Self { base })
    }

    /// Upstream TLS trusting the roots `sources` describe.
    pub fn from_sources(sources: &RootSources) -> Result<Self, UpstreamError> {
        Self::new(load_roots(sources)?.store)
    }

    /// A client configuration offering `alpn` (e.g. the protocols the
    /// intercepted client offered), in that order.
    /// It shares the verifier, the client credentials and the session
    /// store with every other connection's, so sessions resume.
    pub fn client_config(&self, alpn: &[String]) -> Arc<ClientConfig> {
        let mut config = self.base.clone();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(config)
    }

    /// Runs the TLS handshake with the upstream over `io` (an established
    /// connection to the original destination). The negotiated ALPN
    /// protocol is on the returned stream (`get_ref().1.alpn_protocol()`).
    pub async fn connect<IO>(
        &self,
        io: IO,
        server_name: ServerName<'static>,
        alpn: &[String],
    ) -> Result<TlsStream<IO>, UpstreamError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let config = self.client_config(alpn);
        let server = server_name.to_str().into_owned();
        tokio_rustls::TlsConnector::from(config)
            .connect(server_name, io)
            .await
            .map_err(|source| UpstreamError::Handshake {
                server,
                reason: describe_io_error(&source),
                source,
            })
    }
}

/// The provider with TLS_AES_128_GCM_SHA256 offered first (the others keep
/// their order): its key schedule hashes with SHA-256, which has CPU
/// instructions here, where SHA-384 (of the AES-256 suite) does not, and it
/// is the suite every TLS 1.3 server must support. Only the agent's own
/// offer to upstreams changes; the client's choice on its leg is honoured.
fn prefer_sha256_suite(
    provider: &rustls::crypto::CryptoProvider,
) -> rustls::crypto::CryptoProvider {
    let mut p = provider.clone();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    p
}

/// A readable reason for an I/O error from a TLS stream: the rustls error
/// inside it if there is one, else the I/O error itself.
pub fn describe_io_error(err: &io::Error) -> String {
    if let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        return describe_tls_error(tls);
    }
    match err.kind() {
        io::ErrorKind::UnexpectedEof => {
            "upstream closed the connection during the TLS handshake".into()
        }
        io::ErrorKind::ConnectionReset => {
            "upstream reset the connection during the TLS handshake".into()
        }
        io::ErrorKind::TimedOut => "TLS handshake with upstream timed out".into(),
        _ => err.to_string(),
    }
}

/// A short, human-readable reason for a rustls error, fit for a 502 body and
/// an event: "certificate has expired", "certificate is not valid for name
/// example.test", "unknown issuer (self-signed or untrusted CA)", ...
pub fn describe_tls_error(err: &rustls::Error) -> String {
    use rustls::Error;
    match err {
        Error::InvalidCertificate(cert) => describe_certificate_error(cert),
        Error::NoCertificatesPresented => "upstream presented no certificate".into(),
        Error::AlertReceived(alert) => {
            format!("upstream refused the TLS handshake (alert: {alert:?})")
        }
        Error::PeerIncompatible(why) => {
            format!("upstream has no TLS version or cipher suite in common with Guard ({why:?})")
        }
        Error::PeerMisbehaved(why) => format!("upstream violated the TLS protocol ({why:?})"),
        Error::InvalidMessage(why) => format!("upstream sent an invalid TLS message ({why:?})"),
        Error::NoApplicationProtocol => {
            "upstream accepted none of the offered ALPN protocols".into()
        }
        Error::DecryptError => "TLS decryption with upstream failed".into(),
        other => format!("TLS error: {other}"),
    }
}

fn describe_certificate_error(err: &CertificateError) -> String {
    #[allow(deprecated)]
    match err {
        CertificateError::Expired => "certificate has expired".into(),
        CertificateError::ExpiredContext { not_after, .. } => {
            format!("certificate has expired (on {})", rfc3339(not_after))
        }
        CertificateError::NotValidYet => "certificate is not valid yet".into(),
        CertificateError::NotValidYetContext { not_before, .. } => {
            format!(
                "certificate is not valid yet (until {})",
                rfc3339(not_before)
            )
        }
        CertificateError::NotValidForName => {
            "certificate is not valid for the requested name".into()
        }
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => {
            let expected = expected.to_str();
            if presented.is_empty() {
                format!("certificate is not valid for name {expected}")
            } else {
                format!(
                    "certificate is not valid for name {expected} (it is valid for {})",
                    presented.join(", ")
                )
            }
        }
        CertificateError::UnknownIssuer => "unknown issuer (self-signed or untrusted CA)".into(),
        CertificateError::BadSignature => "certificate has an invalid signature".into(),
        CertificateError::BadEncoding => "certificate is malformed".into(),
        CertificateError::Revoked => "certificate has been revoked".into(),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "certificate is not valid for TLS server authentication".into()
        }
        CertificateError::UnhandledCriticalExtension => {
            "certificate has an unsupported critical extension".into()
        }
        CertificateError::UnsupportedSignatureAlgorithm
        | CertificateError::UnsupportedSignatureAlgorithmContext { .. }
        | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
            "certificate uses an unsupported signature algorithm".into()
        }
        other => format!("certificate rejected: {other}"),
    }
}

fn rfc3339(t: &UnixTime) -> String {
    i64::try_from(t.as_secs())
        .ok()
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{}s after the epoch", t.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose,
    };
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::ServerConfig;
    use std::path::Path;
    use time::{Duration, OffsetDateTime};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A CA of the test's own, standing in for a public CA.
    struct TestCa {
        issuer: CertifiedIssuer<'static, KeyPair>,
    }

    impl TestCa {
        fn new(name: &str) -> Self {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            Self {
                issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
            }
        }

        fn write_pem(&self, dir: &Path) -> PathBuf {
            let path = dir.join("upstream-ca.pem");
            std::fs::write(&path, self.issuer.pem()).unwrap();
            path
        }

        /// A server config presenting a leaf for `name`, valid from
        /// `not_before` to `not_after`.
        fn server(
            &self,
            name: &str,
            not_before: OffsetDateTime,
            not_after: OffsetDateTime,
        ) -> Arc<ServerConfig> {
            let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
            params.not_before = not_before;
            params.not_after = not_after;
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            let mut config = ServerConfig::builder_with_provider(crate::tls::crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.der().clone()], key)
                .unwrap();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Arc::new(config)
        }

        fn valid_server(&self, name: &str) -> Arc<ServerConfig> {
            let now = OffsetDateTime::now_utc();
            self.server(name, now - Duration::days(1), now + Duration::days(30))
        }
    }

    /// Serves one TLS connection on 127.0.0.1 and answers "pong" to "ping".
    async fn serve_once(config: Arc<ServerConfig>) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let Ok(mut tls) = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await else {
                return;
            };
            let mut buf = [0u8; 4];
            if tls.read_exact(&mut buf).await.is_ok() {
                let _ = tls.write_all(b"pong").await;
                let _ = tls.shutdown().await;
            }
        });
        addr
    }

    fn only_extra(path: PathBuf) -> RootSources {
        RootSources {
            system: false,
            extra_pem_files: vec![path],
            exclude: Vec::new(),
        }
    }

    async fn connect(
        upstream: &UpstreamTls,
        server: Arc<ServerConfig>,
        name: &str,
    ) -> Result<TlsStream<TcpStream>, UpstreamError> {
        let addr = serve_once(server).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = server_name(Some(name), addr.ip()).unwrap();
        upstream
            .connect(tcp, name, &["h2".into(), "http/1.1".into()])
            .await
    }

    #[tokio::test]
    async fn an_upstream_signed_by_an_extra_root_is_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("Upstream test CA");
        let roots = load_roots(&only_extra(ca.write_pem(dir.path()))).unwrap();
        assert_eq!((roots.system, roots.extra), (0, 1));
        let upstream = UpstreamTls::new(roots.store).unwrap();

        let mut tls = connect(&upstream, ca.valid_server("upstream.test"), "upstream.test")
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        tls.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }

    #[tokio::test]
    async fn a_second_connection_to_the_same_upstream_resumes_its_session() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("Upstream test CA");
        let upstream = UpstreamTls::from_sources(&only_extra(ca.write_pem(dir.path()))).unwrap();
        // One server configuration (one session cache), as one real server.
        let server = ca.valid_server("upstream.test");
        let mut kinds = Vec::new();
        for _ in 0..3 {
            let mut tls = connect(&upstream, server.clone(), "upstream.test")
                .await
                .unwrap();
            // The server's tickets arrive before its answer.
            tls.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.unwrap();
            kinds.push(tls.get_ref().1.handshake_kind());
        }
        use rustls::HandshakeKind::{Full, Resumed};
        assert_eq!(kinds, [Some(Full), Some(Resumed), Some(Resumed)]);
    }

    #[tokio::test]
    async fn upstreams_are_offered_aes_128_gcm_sha256_first() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("Upstream test CA");
        let upstream = UpstreamTls::from_sources(&only_extra(ca.write_pem(dir.path()))).unwrap();
        let offered: Vec<_> = upstream
            .client_config(&[])
            .crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(offered[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(offered.len(), crypto_provider_suites());
        // A server that follows the client's order (rustls does) picks it.
        let tls = connect(&upstream, ca.valid_server("upstream.test"), "upstream.test")
            .await
            .unwrap();
        assert_eq!(
            tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
    }

    fn crypto_provider_suites() -> usize {
        crate::tls::crypto_provider().cipher_suites.len()
    }

    #[tokio::test]
    async fn an_expired_upstream_certificate_is_refused_with_a_readable_reason() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("Upstream test CA");
        let upstream = UpstreamTls::from_sources(&only_extra(ca.write_pem(dir.path()))).unwrap();
        let now = OffsetDateTime::now_utc();
        let expired = ca.server(
            "upstream.test",
            now - Duration::days(60),
            now - Duration::days(30),
        );

        let err = connect(&upstream, expired, "upstream.test")
            .await
            .unwrap_err();
        let reason = err.reason();
        assert!(reason.starts_with("certificate has expired"), "{reason}");
        assert!(err.to_string().contains("upstream.test"), "{err}");
    }

    #[tokio::test]
    async fn a_certificate_for_another_name_is_refused_with_a_readable_reason() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("Upstream test CA");
        let upstream = UpstreamTls::from_sources(&only_extra(ca.write_pem(dir.path()))).unwrap();

        let err = connect(&upstream, ca.valid_server("other.test"), "upstream.test")
            .await
            .unwrap_err();
        let reason = err.reason();
        assert!(
            reason.starts_with("certificate is not valid for name upstream.test"),
            "{reason}"
        );
        assert!(reason.contains("other.test"), "{reason}");
    }

    #[tokio::test]
    async fn an_upstream_signed_by_an_unknown_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let trusted = TestCa::new("Trusted test CA");
        let stranger = TestCa::new("Stranger test CA");
        let upstream =
            UpstreamTls::from_sources(&only_extra(trusted.write_pem(dir.path()))).unwrap();

        let err = connect(
            &upstream,
            stranger.valid_server("upstream.test"),
            "upstream.test",
        )
        .await
        .unwrap_err();
        assert_eq!(err.reason(), "unknown issuer (self-signed or untrusted CA)");
    }

    #[test]
    fn root_loading_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = load_roots(&only_extra(missing.clone())).unwrap_err();
        assert!(matches!(err, UpstreamError::ReadRoots { .. }), "{err}");
        assert!(err.to_string().contains(&missing.display().to_string()));

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = load_roots(&only_extra(empty)).unwrap_err();
        assert!(
            matches!(err, UpstreamError::NoCertificatesInFile { .. }),
            "{err}"
        );

        let none = RootSources {
            system: false,
            ..RootSources::default()
        };
        assert!(matches!(load_roots(&none), Err(UpstreamError::NoRoots)));
    }

    #[test]
    fn excluded_certificates_are_never_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let guard_ca = TestCa::new("Guard local CA (test)");
        let other = TestCa::new("Other test CA");
        let both = dir.path().join("both.pem");
        std::fs::write(&both, guard_ca.issuer.pem() + &other.issuer.pem()).unwrap();
        let sources = RootSources {
            system: false,
            extra_pem_files: vec![both],
            exclude: vec![guard_ca.issuer.der().clone()],
        };
        let roots = load_roots(&sources).unwrap();
        assert_eq!(roots.extra, 1);
        assert_eq!(roots.store.len(), 1);
    }

    #[test]
    fn system_roots_load_when_the_host_has_them() {
        let has_bundle = Path::new("/etc/ssl/certs/ca-certificates.crt").exists();
        match load_roots(&RootSources::default()) {
            Ok(roots) => assert!(roots.system > 0),
            Err(err) => assert!(!has_bundle, "{err}"),
        }
    }

    #[test]
    fn sni_or_destination_address_names_the_upstream() {
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(
            server_name(Some("example.test"), ip).unwrap().to_str(),
            "example.test"
        );
        assert_eq!(
            server_name(None, ip).unwrap(),
            ServerName::IpAddress(ip.into())
        );
        assert!(server_name(Some("bad name"), ip).is_err());
    }

    #[test]
    fn tls_errors_read_like_a_sentence() {
        use rustls::{AlertDescription, Error};
        let cases = [
            (
                Error::InvalidCertificate(CertificateError::Expired),
                "certificate has expired",
            ),
            (
                Error::InvalidCertificate(CertificateError::NotValidForName),
                "certificate is not valid for the requested name",
            ),
            (
                Error::InvalidCertificate(CertificateError::UnknownIssuer),
                "unknown issuer (self-signed or untrusted CA)",
            ),
            (
                Error::InvalidCertificate(CertificateError::Revoked),
                "certificate has been revoked",
            ),
            (
                Error::AlertReceived(AlertDescription::HandshakeFailure),
                "upstream refused the TLS handshake (alert: HandshakeFailure)",
            ),
            (
                Error::NoApplicationProtocol,
                "upstream accepted none of the offered ALPN protocols",
            ),
        ];
        for (err, expected) in cases {
            assert_eq!(describe_tls_error(&err), expected);
        }
        let wrapped = io::Error::new(
            io::ErrorKind::InvalidData,
            Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        assert_eq!(
            describe_io_error(&wrapped),
            "unknown issuer (self-signed or untrusted CA)"
        );
        let expired = CertificateError::ExpiredContext {
            time: UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_700_000_000)),
            not_after: UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_600_000_000)),
        };
        assert_eq!(
            describe_certificate_error(&expired),
            "certificate has expired (on 2020-09-13T12:26:40Z)"
        );
    }
}
