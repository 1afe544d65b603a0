//! Recognises the protocol of a redirected connection from the first bytes
//! its client sends, without consuming them.
//!
//! [`classify`] is a pure function of a byte prefix: it says whether the
//! prefix is a TLS ClientHello (with its SNI, ALPN offer and versions), an
//! HTTP/1.x request line, the HTTP/2 prior-knowledge preface, something else
//! ([`Sniff::Opaque`]), a TLS handshake that does not parse
//! ([`Sniff::Malformed`]), or too short to tell yet ([`Sniff::NeedMore`]).
//! [`peek_classify`] feeds it from `TcpStream::peek` until it can tell, the
//! peek buffer is full, the client goes quiet, or a timeout expires; the
//! bytes stay in the socket for whoever handles the connection next
//! (the TLS acceptor, the HTTP server or a splice).
//!
//! Invariants:
//! - Never reads past [`MAX_SNIFF_BYTES`] and never panics, whatever the
//!   input: the parser is bounds-checked everywhere and is fuzzed in tests.
//! - A ClientHello spread over several TLS records is reassembled.
//! - Classification is monotonic: once a prefix is classified as something
//!   other than `NeedMore`, every longer prefix is classified the same way.
//!
//! Never: consume bytes from the socket, or decide policy. This module only
//! describes what the client sent.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// The most bytes sniffing ever looks at (a TLS record is at most 16 KiB).
pub const MAX_SNIFF_BYTES: usize = 16 * 1024;
/// The longest HTTP/1 request line recognised.
const MAX_REQUEST_LINE: usize = 8 * 1024;
/// The longest method token recognised (`VERSION-CONTROL` is 15).
const MAX_METHOD_LEN: usize = 24;
/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const MAX_RECORD_LEN: usize = 1 << 14;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const EXT_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;

/// What the first bytes of a connection are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniff {
    /// Too few bytes to tell; peek again when more arrive.
    NeedMore,
    /// A complete, well-formed TLS ClientHello.
    Tls(ClientHelloInfo),
    /// An HTTP/1.x request line.
    Http1(Http1Request),
    /// The HTTP/2 prior-knowledge (cleartext h2) connection preface.
    Http2PriorKnowledge,
    /// Neither TLS nor HTTP: some other protocol.
    Opaque,
    /// Starts like a TLS handshake but does not parse as a ClientHello.
    Malformed { reason: &'static str },
}

/// What a ClientHello says about the connection the client wants.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHelloInfo {
    /// The server name (SNI) the client asked for, as sent (not normalised).
    /// With ECH this is the outer, public name.
    pub sni: Option<String>,
    /// The ALPN protocols offered, in the client's order (lossy UTF-8).
    pub alpn: Vec<String>,
    /// The version in the record header (often 0x0301).
    pub record_version: u16,
    /// The ClientHello's `legacy_version` (0x0303 for TLS 1.2 and 1.3).
    pub legacy_version: u16,
    /// The `supported_versions` extension (0x0304 = TLS 1.3), if present.
    pub supported_versions: Vec<u16>,
    /// The cipher suites offered, in order.
    pub cipher_suites: Vec<u16>,
    /// The extension types, in order (GREASE values included).
    pub extensions: Vec<u16>,
    /// Whether the client offered Encrypted Client Hello.
    pub ech: bool,
    /// How many TLS records carried the ClientHello.
    pub records: usize,
    /// How many bytes of the stream the ClientHello's records occupy.
    pub len: usize,
}

impl ClientHelloInfo {
    /// Whether the client offers TLS 1.3.
    pub fn offers_tls13(&self) -> bool {
        self.supported_versions.contains(&0x0304)
    }
}

/// An HTTP/1.x request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http1Request {
    pub method: String,
    /// The request target as sent: origin form (`/path`), absolute form
    /// (`http://host/path`), authority form (`host:443`, for CONNECT) or `*`.
    pub target: String,
    pub version: Http1Version,
}

/// The HTTP/1 minor version of a request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Http1Version {
    Http10,
    Http11,
}

/// Classifies the first bytes a client sent. Looks at most at
/// [`MAX_SNIFF_BYTES`] of `buf`.
pub fn classify(buf: &[u8]) -> Sniff {
    let buf = &buf[..buf.len().min(MAX_SNIFF_BYTES)];
    match buf.first() {
        None => Sniff::NeedMore,
        Some(&CONTENT_TYPE_HANDSHAKE) => classify_tls(buf),
        Some(b'A'..=b'Z') => classify_http(buf),
        Some(_) => Sniff::Opaque,
    }
}

/// Why [`peek_classify`] stopped peeking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeekStop {
    /// [`classify`] gave an answer other than `NeedMore`.
    Classified,
    /// `max_bytes` were buffered and still no answer.
    LimitReached,
    /// The timeout expired (e.g. a server-speaks-first protocol, or a client
    /// that went quiet mid-ClientHello).
    TimedOut,
    /// The client closed the connection without sending anything.
    Closed,
}

/// The outcome of [`peek_classify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peeked {
    /// The classification of the bytes seen (`NeedMore` unless `Classified`).
    pub sniff: Sniff,
    /// How many bytes were waiting in the socket at the last peek.
    pub bytes: usize,
    pub stop: PeekStop,
}

/// Peeks at `stream` until [`classify`] can tell what it carries, up to
/// `max_bytes` (capped at [`MAX_SNIFF_BYTES`]) and `timeout`. Consumes
/// nothing: all bytes peeked are still there for the next reader.
pub async fn peek_classify(
    stream: &TcpStream,
    max_bytes: usize,
    timeout: Duration,
) -> io::Result<Peeked> {
    const FIRST_BACKOFF: Duration = Duration::from_millis(1);
    const MAX_BACKOFF: Duration = Duration::from_millis(25);

    let max = max_bytes.clamp(1, MAX_SNIFF_BYTES);
    let mut buf = vec![0u8; max];
    let deadline = Instant::now() + timeout;
    let mut seen = 0;
    let mut backoff = FIRST_BACKOFF;
    let done = |sniff, bytes, stop| Ok(Peeked { sniff, bytes, stop });
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_elapsed) => return done(classify(&buf[..seen]), seen, PeekStop::TimedOut),
            Ok(result) => result?,
        };
        if n == 0 {
            return done(Sniff::NeedMore, 0, PeekStop::Closed);
        }
        let sniff = classify(&buf[..n]);
        if sniff != Sniff::NeedMore {
            return done(sniff, n, PeekStop::Classified);
        }
        if n >= max {
            return done(sniff, n, PeekStop::LimitReached);
        }
        // A peek does not clear the socket's readiness, so the next peek
        // returns at once with the same bytes: wait a little for more.
        if n == seen {
            let now = Instant::now();
            if now >= deadline {
                return done(sniff, n, PeekStop::TimedOut);
            }
            tokio::time::sleep(backoff.min(deadline - now)).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        } else {
            backoff = FIRST_BACKOFF;
        }
        seen = n;
    }
}

// ---- TLS -------------------------------------------------------------------

fn classify_tls(buf: &[u8]) -> Sniff {
    // The first record header decides whether this is TLS at all: a stray
    // 0x16 followed by anything else is just some other protocol.
    match buf.get(1..3) {
        None if buf.get(1).is_some_and(|&major| major != 3) => return Sniff::Opaque,
        None => return Sniff::NeedMore,
        Some(&[3, minor]) if minor <= 4 => {}
        Some(_) => return Sniff::Opaque,
    }
    let record_version = u16::from_be_bytes([buf[1], buf[2]]);

    // Reassemble the handshake message from as many records as it spans.
    let mut handshake = Vec::new();
    let mut pos = 0;
    let mut records = 0;
    loop {
        let Some(header) = buf.get(pos..pos + 5) else {
            return Sniff::NeedMore;
        };
        if header[0] != CONTENT_TYPE_HANDSHAKE {
            return malformed("a non-handshake record arrived before the ClientHello was complete");
        }
        if header[1] != 3 || header[2] > 4 {
            return malformed("TLS record with an unknown version");
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 {
            return malformed("empty TLS handshake record");
        }
        if len > MAX_RECORD_LEN {
            return malformed("TLS record longer than 2^14 bytes");
        }
        let body_start = pos + 5;
        let record_end = body_start + len;
        let available = record_end.min(buf.len());
        handshake.extend_from_slice(&buf[body_start..available]);
        records += 1;

        if handshake
            .first()
            .is_some_and(|&t| t != HANDSHAKE_CLIENT_HELLO)
        {
            return malformed("the first handshake message is not a ClientHello");
        }
        if let Some(header) = handshake.get(1..4) {
            let hello_len =
                usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            if 4 + hello_len > MAX_SNIFF_BYTES - 5 {
                return malformed("ClientHello larger than the 16 KiB sniffing limit");
            }
            if handshake.len() > 4 + hello_len
                || (handshake.len() == 4 + hello_len && available < record_end)
            {
                // Bytes after the ClientHello in its last record: legal for
                // other handshake messages, never sent by clients.
                return malformed("unexpected data after the ClientHello");
            }
            if handshake.len() == 4 + hello_len {
                return match parse_client_hello(&handshake[4..4 + hello_len]) {
                    Ok(mut info) => {
                        info.record_version = record_version;
                        info.records = records;
                        info.len = record_end;
                        Sniff::Tls(info)
                    }
                    Err(reason) => malformed(reason),
                };
            }
        }
        if available < record_end {
            return Sniff::NeedMore;
        }
        pos = record_end;
    }
}

fn malformed(reason: &'static str) -> Sniff {
    Sniff::Malformed { reason }
}

/// A bounds-checked reader over a byte slice; every read is `None` past the end.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

fn parse_client_hello(body: &[u8]) -> Result<ClientHelloInfo, &'static str> {
    let truncated = "truncated ClientHello";
    let mut r = Reader::new(body);
    let mut info = ClientHelloInfo {
        legacy_version: r.u16().ok_or(truncated)?,
        ..ClientHelloInfo::default()
    };
    if info.legacy_version >> 8 != 3 {
        return Err("ClientHello with an unknown legacy_version");
    }
    r.take(32).ok_or(truncated)?; // random
    let session_id = r.vec8().ok_or(truncated)?;
    if session_id.len() > 32 {
        return Err("ClientHello session id longer than 32 bytes");
    }
    let suites = r.vec16().ok_or(truncated)?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err("ClientHello with an invalid cipher suite list");
    }
    info.cipher_suites = suites
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    let compression = r.vec8().ok_or(truncated)?;
    if compression.is_empty() {
        return Err("ClientHello with no compression method");
    }
    if r.is_empty() {
        return Ok(info); // no extensions (SSL 3.0 / early TLS clients)
    }
    let mut extensions = Reader::new(r.vec16().ok_or(truncated)?);
    if !r.is_empty() {
        return Err("unexpected bytes after the ClientHello extensions");
    }
    while !extensions.is_empty() {
        let kind = extensions.u16().ok_or(truncated)?;
        let data = extensions.vec16().ok_or(truncated)?;
        if info.extensions.contains(&kind) {
            return Err("ClientHello with a duplicate extension");
        }
        info.extensions.push(kind);
        match kind {
            EXT_SERVER_NAME => info.sni = parse_server_name(data)?,
            EXT_ALPN => info.alpn = parse_alpn(data)?,
            EXT_SUPPORTED_VERSIONS => info.supported_versions = parse_versions(data)?,
            EXT_ENCRYPTED_CLIENT_HELLO => info.ech = true,
            _ => {}
        }
    }
    Ok(info)
}

fn parse_server_name(data: &[u8]) -> Result<Option<String>, &'static str> {
    let bad = "malformed server_name extension";
    let mut outer = Reader::new(data);
    let mut list = Reader::new(outer.vec16().ok_or(bad)?);
    if !outer.is_empty() {
        return Err(bad);
    }
    let mut host = None;
    while !list.is_empty() {
        let name_type = list.u8().ok_or(bad)?;
        let name = list.vec16().ok_or(bad)?;
        if name_type == 0 && host.is_none() {
            if name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
                return Err("server name is not a printable ASCII host name");
            }
            // All bytes are ASCII, so this cannot fail.
            host = Some(String::from_utf8_lossy(name).into_owned());
        }
    }
    Ok(host)
}

fn parse_alpn(data: &[u8]) -> Result<Vec<String>, &'static str> {
    let bad = "malformed ALPN extension";
    let mut outer = Reader::new(data);
    let mut list = Reader::new(outer.vec16().ok_or(bad)?);
    if !outer.is_empty() {
        return Err(bad);
    }
    let mut protocols = Vec::new();
    while !list.is_empty() {
        let protocol = list.vec8().ok_or(bad)?;
        if protocol.is_empty() {
            return Err("empty ALPN protocol name");
        }
        protocols.push(String::from_utf8_lossy(protocol).into_owned());
    }
    Ok(protocols)
}

fn parse_versions(data: &[u8]) -> Result<Vec<u16>, &'static str> {
    let bad = "malformed supported_versions extension";
    let mut outer = Reader::new(data);
    let list = outer.vec8().ok_or(bad)?;
    if !outer.is_empty() || list.len() % 2 != 0 {
        return Err(bad);
    }
    Ok(list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect())
}

// ---- HTTP ------------------------------------------------------------------

fn classify_http(buf: &[u8]) -> Sniff {
    if buf.starts_with(b"PRI ") || H2_PREFACE.starts_with(buf) {
        return if buf.starts_with(H2_PREFACE) {
            Sniff::Http2PriorKnowledge
        } else if H2_PREFACE.starts_with(buf) {
            Sniff::NeedMore
        } else {
            Sniff::Opaque
        };
    }

    let window = &buf[..buf.len().min(MAX_REQUEST_LINE)];
    let (line, complete) = match window.iter().position(|&b| b == b'\n') {
        Some(end) => {
            let line = &window[..end];
            (line.strip_suffix(b"\r").unwrap_or(line), true)
        }
        None if window.len() == MAX_REQUEST_LINE => return Sniff::Opaque,
        // A trailing CR may be the first half of the line end.
        None => (window.strip_suffix(b"\r").unwrap_or(window), false),
    };
    let need_more = if complete {
        Sniff::Opaque
    } else {
        Sniff::NeedMore
    };

    let mut parts = line.splitn(3, |&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    if method.len() > MAX_METHOD_LEN
        || !method
            .iter()
            .all(|&b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
    {
        return Sniff::Opaque;
    }
    let Some(target) = parts.next() else {
        return need_more;
    };
    if !target.iter().all(|&b| b > b' ' && b != 0x7f) {
        return Sniff::Opaque;
    }
    let Some(version) = parts.next() else {
        return need_more;
    };
    if target.is_empty() {
        return Sniff::Opaque;
    }
    let version = match version {
        b"HTTP/1.1" => Http1Version::Http11,
        b"HTTP/1.0" => Http1Version::Http10,
        partial if !complete && (b"HTTP/1.1".starts_with(partial) || partial == b"HTTP/1.0") => {
            // "HTTP/1.0" without its line end yet still needs the CRLF.
            return Sniff::NeedMore;
        }
        _ => return Sniff::Opaque,
    };
    if !complete {
        return Sniff::NeedMore;
    }
    Sniff::Http1(Http1Request {
        method: String::from_utf8_lossy(method).into_owned(),
        target: String::from_utf8_lossy(target).into_owned(),
        version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The ClientHello a real rustls client sends to `example.test`.
    fn rustls_client_hello(alpn: &[&str]) -> Vec<u8> {
        let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from("example.test").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Re-frames a single-record ClientHello into records of `chunk` bytes.
    fn split_into_records(hello: &[u8], chunk: usize) -> Vec<u8> {
        let (header, body) = hello.split_at(5);
        let mut out = Vec::new();
        for piece in body.chunks(chunk) {
            out.extend_from_slice(&header[..3]);
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
        }
        out
    }

    fn expect_tls(sniff: Sniff) -> ClientHelloInfo {
        match sniff {
            Sniff::Tls(info) => info,
            other => panic!("expected a ClientHello, got {other:?}"),
        }
    }

    #[test]
    fn a_rustls_client_hello_yields_its_sni_and_alpn() {
        let hello = rustls_client_hello(&["h2", "http/1.1"]);
        let info = expect_tls(classify(&hello));
        assert_eq!(info.sni.as_deref(), Some("example.test"));
        assert_eq!(info.alpn, ["h2", "http/1.1"]);
        assert_eq!(info.legacy_version, 0x0303);
        assert!(info.offers_tls13());
        assert!(!info.ech);
        assert_eq!(info.records, 1);
        assert_eq!(info.len, hello.len());
        assert!(!info.cipher_suites.is_empty());
        assert!(info.extensions.contains(&EXT_SERVER_NAME));
    }

    #[test]
    fn every_prefix_of_a_client_hello_needs_more() {
        let hello = rustls_client_hello(&["http/1.1"]);
        for end in 0..hello.len() {
            assert_eq!(
                classify(&hello[..end]),
                Sniff::NeedMore,
                "prefix of {end} bytes"
            );
        }
        // Trailing application bytes after the hello do not matter.
        let mut longer = hello.clone();
        longer.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        assert_eq!(expect_tls(classify(&longer)).len, hello.len());
    }

    #[test]
    fn a_client_hello_spread_over_several_records_is_reassembled() {
        let hello = rustls_client_hello(&["h2"]);
        let split = split_into_records(&hello, 50);
        let info = expect_tls(classify(&split));
        assert!(info.records > 2);
        assert_eq!(info.len, split.len());
        assert_eq!(info.sni.as_deref(), Some("example.test"));
        assert_eq!(info.alpn, ["h2"]);
        for end in 0..split.len() {
            assert_eq!(
                classify(&split[..end]),
                Sniff::NeedMore,
                "prefix of {end} bytes"
            );
        }
    }

    #[test]
    fn tls_lookalikes_are_opaque_or_malformed_with_a_reason() {
        assert_eq!(classify(&[0x16, 0x01]), Sniff::Opaque);
        assert_eq!(classify(&[0x16, 0x03, 0x09]), Sniff::Opaque);
        // A record that is not a ClientHello.
        let server_hello = [0x16, 3, 3, 0, 4, 2, 0, 0, 0];
        assert!(matches!(classify(&server_hello), Sniff::Malformed { .. }));
        // A hello announcing more than the sniffing limit.
        let huge = [0x16, 3, 1, 0x40, 0, 1, 0x01, 0, 0];
        assert_eq!(
            classify(&huge),
            Sniff::Malformed {
                reason: "ClientHello larger than the 16 KiB sniffing limit"
            }
        );
        // A valid hello whose SNI bytes were replaced by a control character.
        let mut hello = rustls_client_hello(&[]);
        let at = hello
            .windows(12)
            .position(|w| w == b"example.test")
            .unwrap();
        hello[at] = 0x07;
        assert!(matches!(classify(&hello), Sniff::Malformed { .. }));
    }

    #[test]
    fn http1_request_lines_are_recognised() {
        let cases: &[(&[u8], &str, &str, Http1Version)] = &[
            (
                b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
                "GET",
                "/",
                Http1Version::Http11,
            ),
            (
                b"POST /v1/upload?x=1 HTTP/1.0\r\n",
                "POST",
                "/v1/upload?x=1",
                Http1Version::Http10,
            ),
            (
                b"CONNECT example.test:443 HTTP/1.1\r\n",
                "CONNECT",
                "example.test:443",
                Http1Version::Http11,
            ),
            (
                b"GET http://a.test/x HTTP/1.1\n",
                "GET",
                "http://a.test/x",
                Http1Version::Http11,
            ),
            (
                b"OPTIONS * HTTP/1.1\r\n",
                "OPTIONS",
                "*",
                Http1Version::Http11,
            ),
        ];
        for (bytes, method, target, version) in cases {
            let expected = Sniff::Http1(Http1Request {
                method: method.to_string(),
                target: target.to_string(),
                version: *version,
            });
            assert_eq!(
                classify(bytes),
                expected,
                "{}",
                String::from_utf8_lossy(bytes)
            );
            let line_end = bytes.iter().position(|&b| b == b'\n').unwrap();
            for end in 0..line_end {
                assert_eq!(
                    classify(&bytes[..end]),
                    Sniff::NeedMore,
                    "prefix of {end} bytes"
                );
            }
        }
    }

    #[test]
    fn non_http_text_is_opaque() {
        for bytes in [
            &b"SSH-2.0-OpenSSH_9.6\r\n"[..],
            b"GET / HTTP/2.0\r\n",
            b"get / HTTP/1.1\r\n",
            b"GET  / HTTP/1.1\r\n",
            b"GET /a b HTTP/1.1\r\n",
            b"EHLO example.test\r\n",
            b"\x00\x00\x00\x01",
            b"*1\r\n$4\r\nPING\r\n",
        ] {
            assert_eq!(
                classify(bytes),
                Sniff::Opaque,
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
        let long = [b'A'; MAX_REQUEST_LINE + 10];
        assert_eq!(classify(&long), Sniff::Opaque);
    }

    #[test]
    fn the_h2_prior_knowledge_preface_is_recognised() {
        assert_eq!(classify(H2_PREFACE), Sniff::Http2PriorKnowledge);
        assert_eq!(classify(&H2_PREFACE[..10]), Sniff::NeedMore);
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Sniff::Opaque);
    }

    /// xorshift64*: deterministic pseudo-random bytes without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_truncated_and_mutated_inputs_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let seeds = [
            rustls_client_hello(&["h2", "http/1.1"]),
            split_into_records(&rustls_client_hello(&["h2"]), 7),
            b"GET /index.html HTTP/1.1\r\nHost: example.test\r\n\r\n".to_vec(),
            H2_PREFACE.to_vec(),
        ];
        for _ in 0..20_000 {
            let len = rng.below(700);
            let mut buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            match rng.below(4) {
                0 if !buf.is_empty() => buf[0] = 0x16,
                1 if buf.len() > 3 => buf[..3].copy_from_slice(&[0x16, 3, 1]),
                2 if !buf.is_empty() => buf[0] = b'G',
                _ => {}
            }
            let _ = classify(&buf);
        }
        for seed in &seeds {
            for _ in 0..5_000 {
                let mut buf = seed.clone();
                for _ in 0..=rng.below(4) {
                    let at = rng.below(buf.len());
                    buf[at] = rng.next() as u8;
                }
                buf.truncate(rng.below(buf.len() + 1));
                let _ = classify(&buf);
            }
        }
        let _ = classify(&vec![0x16; 100_000]);
    }

    #[test]
    fn classification_is_stable_as_more_bytes_arrive() {
        let mut rng = Rng(42);
        let seeds = [
            rustls_client_hello(&["h2"]),
            b"POST /v1/items?id=7 HTTP/1.1\r\nHost: example.test\r\n".to_vec(),
            H2_PREFACE.to_vec(),
        ];
        for i in 0..3_000 {
            let mut buf = seeds[i % seeds.len()].clone();
            let at = rng.below(buf.len());
            buf[at] = rng.next() as u8;
            let mut decided: Option<Sniff> = None;
            for end in 0..=buf.len() {
                let sniff = classify(&buf[..end]);
                match (&decided, sniff) {
                    (None, Sniff::NeedMore) => {}
                    (None, s) => decided = Some(s),
                    (Some(d), s) => assert_eq!(d, &s, "prefix of {end} bytes of {buf:?}"),
                }
            }
        }
    }

    async fn loopback_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn peek_waits_for_a_client_hello_sent_in_pieces_and_consumes_nothing() {
        let hello = split_into_records(&rustls_client_hello(&["h2", "http/1.1"]), 100);
        let (mut client, mut server) = loopback_pair().await;
        let sent = hello.clone();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(60) {
                client.write_all(piece).await.unwrap();
                client.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client
        });
        let peeked = peek_classify(&server, MAX_SNIFF_BYTES, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(peeked.stop, PeekStop::Classified);
        let info = expect_tls(peeked.sniff);
        assert_eq!(info.sni.as_deref(), Some("example.test"));
        assert_eq!(info.alpn, ["h2", "http/1.1"]);
        let _client = writer.await.unwrap();

        let mut read_back = vec![0u8; hello.len()];
        server.read_exact(&mut read_back).await.unwrap();
        assert_eq!(read_back, hello, "peeking consumed nothing");
    }

    #[tokio::test]
    async fn peek_recognises_http1_and_times_out_on_silence() {
        let (mut client, server) = loopback_pair().await;
        client
            .write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let peeked = peek_classify(&server, 4096, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(matches!(peeked.sniff, Sniff::Http1(ref r) if r.target == "/x"));

        let (_quiet_client, quiet_server) = loopback_pair().await;
        let peeked = peek_classify(&quiet_server, 4096, Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(peeked.stop, PeekStop::TimedOut);
        assert_eq!(peeked.sniff, Sniff::NeedMore);
        assert_eq!(peeked.bytes, 0);

        let (mut partial_client, partial_server) = loopback_pair().await;
        partial_client.write_all(b"GET /slow HT").await.unwrap();
        let peeked = peek_classify(&partial_server, 4096, Duration::from_millis(80))
            .await
            .unwrap();
        assert_eq!(peeked.stop, PeekStop::TimedOut);
        assert_eq!(peeked.bytes, 12);

        let (closing_client, closing_server) = loopback_pair().await;
        drop(closing_client);
        let peeked = peek_classify(&closing_server, 4096, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(peeked.stop, PeekStop::Closed);
    }

    #[tokio::test]
    async fn peek_stops_at_its_byte_limit() {
        let (mut client, server) = loopback_pair().await;
        client
            .write_all(b"GET /aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
            .await
            .unwrap();
        let peeked = peek_classify(&server, 16, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(peeked.stop, PeekStop::LimitReached);
        assert_eq!(peeked.bytes, 16);
    }
}
