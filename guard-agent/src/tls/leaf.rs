//! Leaf certificates for intercepted connections, minted on demand by the
//! local CA, and the rustls server configuration that presents them.
//!
//! A client that connected to `example.test` (SNI) gets a certificate for
//! DNS name `example.test`; a client that sent no SNI gets one for the IP
//! address it connected to (SAN IP). Each leaf has its own ECDSA P-256 key,
//! is valid for [`LEAF_VALIDITY`] (never past the CA's expiry), and is kept in
//! a bounded LRU cache ([`DEFAULT_CACHE_SIZE`] names by default).
//!
//! Invariants:
//! - One name, one mint: concurrent first requests for the same name wait for
//!   a single minting (a per-name `OnceLock` slot), then share the same
//!   `Arc<CertifiedKey>`.
//! - A cached leaf close to expiry, or a failed mint, is replaced on the next
//!   request, never served.
//! - The server offers only ALPN protocols the agent can serve
//!   ([`SERVABLE_ALPN`]) and that the caller allows.
//!
//! Never: mint for a name that is not a valid DNS name or IP address, or
//! put anything but the leaf's own key and certificate in the cache (the CA
//! key stays in [`LocalCa`]).

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use lru::LruCache;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{DnsName, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use time::{Duration, OffsetDateTime};

use super::ca::LocalCa;

/// How many leaf certificates the cache keeps by default.
pub const DEFAULT_CACHE_SIZE: usize = 1024;
/// How long a minted leaf is valid (capped by the CA's own expiry).
pub const LEAF_VALIDITY: Duration = Duration::days(30);
/// A cached leaf is re-minted once it has less than this left.
const RENEW_BEFORE: Duration = Duration::days(1);
/// Leaves are backdated by this much to tolerate client clock skew.
const BACKDATE: Duration = Duration::hours(1);
/// ALPN protocols the agent's HTTP server can speak, in preference order.
pub const SERVABLE_ALPN: &[&str] = &["h2", "http/1.1"];

/// Why a leaf certificate or server configuration could not be produced.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LeafError {
    #[error("{0:?} is not a valid DNS name for a certificate")]
    InvalidName(String),
    #[error("the client sent no server name and the original destination is unknown")]
    NoName,
    #[error("cannot mint a certificate for {name}: {reason}")]
    Mint { name: String, reason: String },
    #[error("cannot build the TLS server configuration: {0}")]
    Config(String),
}

/// The identity a leaf certificate is minted for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LeafName {
    /// A DNS name, lower-case, without a trailing dot.
    Dns(String),
    /// An IP address, used when the client sent no SNI.
    Ip(IpAddr),
}

impl LeafName {
    /// A DNS name, normalised (lower case, no trailing dot) and validated.
    pub fn dns(name: &str) -> Result<Self, LeafError> {
        let normalised = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if normalised.is_empty() || normalised.parse::<IpAddr>().is_ok() {
            return Err(LeafError::InvalidName(name.to_string()));
        }
        DnsName::try_from(normalised.as_str())
            .map_err(|_| LeafError::InvalidName(name.to_string()))?;
        Ok(Self::Dns(normalised))
    }

    /// The name for a connection: its SNI if it sent one, else the address it
    /// connected to. An SNI that is an IP literal (not allowed by RFC 6066,
    /// but sent by some clients) becomes an IP name.
    pub fn for_connection(
        sni: Option<&str>,
        original_dst: Option<IpAddr>,
    ) -> Result<Self, LeafError> {
        match sni {
            Some(sni) => match sni.parse::<IpAddr>() {
                Ok(ip) => Ok(Self::Ip(ip)),
                Err(_) => Self::dns(sni),
            },
            None => original_dst.map(Self::Ip).ok_or(LeafError::NoName),
        }
    }
}

impl fmt::Display for LeafName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dns(name) => f.write_str(name),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

#[derive(Clone)]
struct Minted {
    key: Arc<CertifiedKey>,
    renew_after: OffsetDateTime,
}

type Slot = Arc<OnceLock<Result<Minted, LeafError>>>;

/// The bounded cache of minted leaves, shared by all connections.
pub struct LeafCache {
    ca: Arc<LocalCa>,
    provider: Arc<CryptoProvider>,
    slots: Mutex<LruCache<LeafName, Slot>>,
    minted: AtomicU64,
    sessions: Arc<ServerSessionMemoryCache>,
}

impl fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafCache")
            .field("ca", &self.ca.subject())
            .field("len", &self.len())
            .field("minted", &self.minted_count())
            .finish_non_exhaustive()
    }
}

impl LeafCache {
    /// A cache holding at most `capacity` leaves (at least one).
    pub fn new(ca: Arc<LocalCa>, capacity: usize) -> Self {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Self {
            ca,
            provider: super::crypto_provider(),
            slots: Mutex::new(LruCache::new(capacity)),
            minted: AtomicU64::new(0),
            sessions: ServerSessionMemoryCache::new(4096),
        }
    }

    /// The leaf for `name`: from the cache, or minted now.
    pub fn get(&self, name: &LeafName) -> Result<Arc<CertifiedKey>, LeafError> {
        let slot = {
            let mut slots = self.lock();
            let now = OffsetDateTime::now_utc();
            let usable = |slot: &Slot| match slot.get() {
                None => true, // being minted by another caller: wait for it
                Some(Ok(minted)) => now < minted.renew_after,
                Some(Err(_)) => false,
            };
            match slots.get(name) {
                Some(slot) if usable(slot) => slot.clone(),
                _ => {
                    let slot = Slot::default();
                    slots.put(name.clone(), slot.clone());
                    slot
                }
            }
        };
        let result = slot.get_or_init(|| self.mint(name)).clone();
        if result.is_err() {
            let mut slots = self.lock();
            if slots.peek(name).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                slots.pop(name);
            }
        }
        result.map(|minted| minted.key)
    }

    /// How many leaves this cache has minted since it was created.
    pub fn minted_count(&self) -> u64 {
        self.minted.load(Ordering::Relaxed)
    }

    /// How many names the cache holds now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the cache holds no name.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The CA that signs this cache's leaves.
    pub fn ca(&self) -> &LocalCa {
        &self.ca
    }

    /// A rustls server configuration for one intercepted connection.
    ///
    /// `client_alpn` is the ALPN list the client offered (from the sniffed
    /// ClientHello), possibly narrowed by the caller (e.g. to `http/1.1` when
    /// the upstream does not speak h2). The server accepts, in the client's
    /// order, those of them it can serve ([`SERVABLE_ALPN`]); if none is
    /// left, ALPN is not negotiated at all rather than failing the handshake.
    /// `original_dst` names the leaf when the client sends no SNI.
    pub fn server_config(
        self: &Arc<Self>,
        client_alpn: &[String],
        original_dst: Option<IpAddr>,
    ) -> Result<Arc<ServerConfig>, LeafError> {
        let resolver = LeafResolver {
            cache: Arc::clone(self),
            original_dst,
        };
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| LeafError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = client_alpn
            .iter()
            .filter(|p| SERVABLE_ALPN.contains(&p.as_str()))
            .map(|p| p.as_bytes().to_vec())
            .collect();
        config.session_storage = self.sessions.clone();
        Ok(Arc::new(config))
    }

    fn lock(&self) -> MutexGuard<'_, LruCache<LeafName, Slot>> {
        // A panic while holding the lock cannot leave the LRU inconsistent
        // for our purposes: keep serving.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mint(&self, name: &LeafName) -> Result<Minted, LeafError> {
        let fail = |reason: String| LeafError::Mint {
            name: name.to_string(),
            reason,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| fail(e.to_string()))?;

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.to_string());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![match name {
            LeafName::Dns(dns) => SanType::DnsName(
                dns.as_str()
                    .try_into()
                    .map_err(|e: rcgen::Error| fail(e.to_string()))?,
            ),
            LeafName::Ip(ip) => SanType::IpAddress(*ip),
        }];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = (now + LEAF_VALIDITY).min(self.ca.not_after());
        params.serial_number =
            Some(super::random_serial().map_err(|_| fail("no randomness".into()))?);

        let cert = params
            .signed_by(&key, self.ca.issuer())
            .map_err(|e| fail(e.to_string()))?;
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = self
            .provider
            .key_provider
            .load_private_key(private)
            .map_err(|e| fail(e.to_string()))?;
        self.minted.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(name = %name, "minted leaf certificate");
        Ok(Minted {
            key: Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing_key)),
            renew_after: params.not_after - RENEW_BEFORE,
        })
    }
}

/// Chooses the leaf for a handshake: by SNI, else by the original destination.
#[derive(Debug)]
pub struct LeafResolver {
    cache: Arc<LeafCache>,
    original_dst: Option<IpAddr>,
}

impl LeafResolver {
    /// A resolver for connections whose original destination is `original_dst`.
    pub fn new(cache: Arc<LeafCache>, original_dst: Option<IpAddr>) -> Self {
        Self {
            cache,
            original_dst,
        }
    }
}

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let found = LeafName::for_connection(hello.server_name(), self.original_dst)
            .and_then(|name| self.cache.get(&name));
        match found {
            Ok(key) => Some(key),
            Err(err) => {
                tracing::warn!(error = %err, "no leaf certificate for handshake");
                None
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, RootCertStore};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use x509_parser::extensions::GeneralName;

    pub(crate) fn test_ca() -> (tempfile::TempDir, Arc<LocalCa>) {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::create(dir.path(), "Guard local CA (test)").unwrap();
        (dir, Arc::new(ca))
    }

    fn client_config(trusted: Option<&LocalCa>, alpn: &[&str]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        if let Some(ca) = trusted {
            roots.add(ca.cert_der().clone()).unwrap();
        }
        let mut config = ClientConfig::builder_with_provider(crate::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(config)
    }

    fn alpn(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_cached_name_returns_the_same_leaf() {
        let (_dir, ca) = test_ca();
        let cache = LeafCache::new(ca, DEFAULT_CACHE_SIZE);
        let a = cache.get(&LeafName::dns("example.test").unwrap()).unwrap();
        let b = cache.get(&LeafName::dns("Example.TEST.").unwrap()).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(cache.minted_count(), 1);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn the_least_recently_used_name_is_evicted() {
        let (_dir, ca) = test_ca();
        let cache = LeafCache::new(ca, 2);
        let name = |n: &str| LeafName::dns(n).unwrap();
        let a = cache.get(&name("a.test")).unwrap();
        cache.get(&name("b.test")).unwrap();
        cache.get(&name("a.test")).unwrap(); // a is now more recent than b
        cache.get(&name("c.test")).unwrap(); // evicts b
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.minted_count(), 3);
        assert!(Arc::ptr_eq(&a, &cache.get(&name("a.test")).unwrap()));
        assert_eq!(cache.minted_count(), 3);
        cache.get(&name("b.test")).unwrap();
        assert_eq!(
            cache.minted_count(),
            4,
            "b was evicted, so it is minted again"
        );
    }

    #[test]
    fn concurrent_first_requests_for_a_name_mint_once() {
        let (_dir, ca) = test_ca();
        let cache = Arc::new(LeafCache::new(ca, 16));
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let cache = cache.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    cache.get(&LeafName::dns("busy.test").unwrap()).unwrap()
                })
            })
            .collect();
        let keys: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(keys.iter().all(|k| Arc::ptr_eq(k, &keys[0])));
        assert_eq!(cache.minted_count(), 1);
    }

    #[test]
    fn invalid_names_are_refused() {
        for bad in ["", ".", "exa mple.test", "bad_\u{e9}.test", "a..b"] {
            assert!(LeafName::dns(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            LeafName::for_connection(None, None)
                .unwrap_err()
                .to_string(),
            LeafError::NoName.to_string()
        );
        assert_eq!(
            LeafName::for_connection(Some("127.0.0.2"), None).unwrap(),
            LeafName::Ip("127.0.0.2".parse().unwrap())
        );
    }

    #[test]
    fn leaves_carry_the_right_san_and_are_signed_by_the_ca() {
        let (_dir, ca) = test_ca();
        let cache = LeafCache::new(ca.clone(), 8);
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();

        let dns = cache.get(&LeafName::dns("example.test").unwrap()).unwrap();
        let ip: IpAddr = "::1".parse().unwrap();
        let by_ip = cache.get(&LeafName::Ip(ip)).unwrap();

        for (key, expected) in [
            (&dns, GeneralName::DNSName("example.test")),
            (
                &by_ip,
                GeneralName::IPAddress(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            ),
        ] {
            assert_eq!(key.cert.len(), 1);
            let (_, leaf) = x509_parser::parse_x509_certificate(&key.cert[0]).unwrap();
            let san = leaf.subject_alternative_name().unwrap().unwrap();
            assert_eq!(san.value.general_names, vec![expected]);
            assert!(!leaf.is_ca());
            assert_eq!(leaf.issuer(), ca_cert.subject());
            leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
            let eku = leaf.extended_key_usage().unwrap().unwrap();
            assert!(eku.value.server_auth);
            assert!(leaf.validity().not_after <= ca_cert.validity().not_after);
            assert!(leaf.validity().is_valid());
        }
    }

    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> (
        std::io::Result<Option<Vec<u8>>>,
        std::io::Result<(Option<String>, Option<Vec<u8>>)>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server_task = tokio::spawn(async move {
            let mut tls = tokio_rustls::TlsAcceptor::from(server)
                .accept(server_io)
                .await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            tls.write_all(b"pong").await?;
            tls.flush().await?;
            let (_, conn) = tls.get_ref();
            Ok::<_, std::io::Error>((
                conn.server_name().map(str::to_string),
                conn.alpn_protocol().map(<[u8]>::to_vec),
            ))
        });
        let client_result = async {
            let mut tls = tokio_rustls::TlsConnector::from(client)
                .connect(name, client_io)
                .await?;
            tls.write_all(b"ping").await?;
            tls.flush().await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"pong");
            Ok(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
        }
        .await;
        let server_result = server_task.await.unwrap();
        (client_result, server_result)
    }

    #[tokio::test]
    async fn a_client_trusting_the_guard_ca_completes_a_handshake_with_h2() {
        let (_dir, ca) = test_ca();
        let cache = Arc::new(LeafCache::new(ca.clone(), 8));
        let server = cache
            .server_config(&alpn(&["h2", "http/1.1"]), None)
            .unwrap();
        let client = client_config(Some(&ca), &["h2", "http/1.1"]);
        let name = ServerName::try_from("example.test").unwrap();
        let (client_result, server_result) = handshake(server, client, name).await;
        assert_eq!(client_result.unwrap().as_deref(), Some(&b"h2"[..]));
        let (sni, server_alpn) = server_result.unwrap();
        assert_eq!(sni.as_deref(), Some("example.test"));
        assert_eq!(server_alpn.as_deref(), Some(&b"h2"[..]));
    }

    #[tokio::test]
    async fn alpn_follows_what_the_caller_allows() {
        let (_dir, ca) = test_ca();
        let cache = Arc::new(LeafCache::new(ca.clone(), 8));
        // The client offers h2, but the caller allows only http/1.1.
        let server = cache.server_config(&alpn(&["http/1.1"]), None).unwrap();
        let client = client_config(Some(&ca), &["h2", "http/1.1"]);
        let name = ServerName::try_from("example.test").unwrap();
        let (client_result, _) = handshake(server, client, name).await;
        assert_eq!(client_result.unwrap().as_deref(), Some(&b"http/1.1"[..]));

        // Protocols the agent cannot serve are never accepted; no ALPN then.
        let server = cache.server_config(&alpn(&["spdy/3"]), None).unwrap();
        let client = client_config(Some(&ca), &["spdy/3"]);
        let name = ServerName::try_from("example.test").unwrap();
        let (client_result, _) = handshake(server, client, name).await;
        assert_eq!(client_result.unwrap(), None);
    }

    #[tokio::test]
    async fn a_client_without_sni_gets_a_leaf_for_the_destination_address() {
        let (_dir, ca) = test_ca();
        let cache = Arc::new(LeafCache::new(ca.clone(), 8));
        let dst: IpAddr = "127.0.0.2".parse().unwrap();
        let server = cache.server_config(&[], Some(dst)).unwrap();
        let client = client_config(Some(&ca), &[]);
        // rustls sends no SNI for an IP address.
        let (client_result, server_result) =
            handshake(server, client, ServerName::IpAddress(dst.into())).await;
        client_result.unwrap();
        assert_eq!(server_result.unwrap().0, None);
        assert!(cache.get(&LeafName::Ip(dst)).is_ok());
        assert_eq!(cache.minted_count(), 1);
    }

    #[tokio::test]
    async fn a_client_not_trusting_the_guard_ca_fails_with_unknown_issuer() {
        let (_dir, ca) = test_ca();
        let cache = Arc::new(LeafCache::new(ca, 8));
        let server = cache.server_config(&alpn(&["h2"]), None).unwrap();
        let client = client_config(None, &["h2"]);
        let name = ServerName::try_from("example.test").unwrap();
        let (client_result, server_result) = handshake(server, client, name).await;
        let err = client_result.unwrap_err();
        let tls_err = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .unwrap_or_else(|| panic!("not a rustls error: {err}"));
        assert_eq!(
            tls_err,
            &rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
        );
        assert!(server_result.is_err());
    }
}
