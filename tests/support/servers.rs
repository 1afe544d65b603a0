//! Small servers on loopback that stand in for external services: they run
//! in the test process (outside every monitored cgroup) and record what they
//! received, so a test can check that bytes arrived intact.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    thread,
};

use sha2::{Digest, Sha256};

/// One request as the HTTP server saw it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub peer: SocketAddr,
}

/// A minimal HTTP/1.1 server (one request per connection) that answers
/// every request with `response_body` and records what it got.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<SeenRequest>>>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn read_request(s: &mut TcpStream, peer: SocketAddr) -> Option<SeenRequest> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(SeenRequest {
        method,
        path,
        headers,
        body,
        peer,
    })
}

impl HttpServer {
    pub fn start(bind: SocketAddr, response_body: &'static str) -> Self {
        Self::start_with(bind, move |_| (200, response_body.to_owned()))
    }

    /// A server whose answer (status, JSON body) depends on the request,
    /// e.g. one that demands an API key.
    pub fn start_with(
        bind: SocketAddr,
        respond: impl Fn(&SeenRequest) -> (u16, String) + Send + Sync + 'static,
    ) -> Self {
        let respond = Arc::new(respond);
        let l = TcpListener::bind(bind).expect("bind test server");
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = Arc::clone(&seen);
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let seen = Arc::clone(&seen2);
                let respond = Arc::clone(&respond);
                thread::spawn(move || {
                    let peer = s.peer_addr().unwrap();
                    if let Some(req) = read_request(&mut s, peer) {
                        let (status, body) = respond(&req);
                        seen.lock().unwrap().push(req);
                        let resp = format!(
                            "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                            if status < 400 { "OK" } else { "Error" },
                            body.len(),
                            body
                        );
                        let _ = s.write_all(resp.as_bytes());
                    }
                });
            }
        });
        Self { addr, seen }
    }

    pub fn requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }
}

/// Echoes every byte back until the client closes.
pub struct EchoServer {
    pub addr: SocketAddr,
}

impl EchoServer {
    pub fn start(bind: SocketAddr) -> Self {
        let l = TcpListener::bind(bind).expect("bind echo server");
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
        Self { addr }
    }
}

/// Reads everything a client sends, then answers with the SHA-256 of it
/// (hex, newline) and the byte count, and closes.
pub struct HashSink {
    pub addr: SocketAddr,
}

impl HashSink {
    pub fn start(bind: SocketAddr) -> Self {
        let l = TcpListener::bind(bind).expect("bind sink");
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                thread::spawn(move || {
                    let mut h = Sha256::new();
                    let mut total = 0u64;
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                h.update(&buf[..n]);
                                total += n as u64;
                            }
                            Err(_) => return,
                        }
                    }
                    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
                    let _ = writeln!(s, "{hex} {total}");
                });
            }
        });
        Self { addr }
    }
}

/// Sends `len` pseudo-random bytes (seeded) to a client on connect, then
/// closes: a download source whose content the client can hash.
pub struct StreamSource {
    pub addr: SocketAddr,
}

impl StreamSource {
    pub fn start(bind: SocketAddr, len: u64) -> Self {
        let l = TcpListener::bind(bind).expect("bind source");
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                thread::spawn(move || {
                    let block = pattern_block();
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(block.len() as u64) as usize;
                        if s.write_all(&block[..n]).is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                });
            }
        });
        Self { addr }
    }
}

/// 1 MiB of deterministic, non-repeating-looking bytes.
pub fn pattern_block() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// SHA-256 of `len` bytes of the repeated [`pattern_block`].
pub fn pattern_sha256(len: u64) -> String {
    let block = pattern_block();
    let mut h = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        h.update(&block[..n]);
        left -= n as u64;
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// An explicit HTTP proxy, as on a corporate network (`HTTPS_PROXY`,
/// `HTTP_PROXY`): it answers `CONNECT host:port` with `200 Connection
/// established` and then copies bytes both ways between the client and
/// `127.0.0.2:port`, whatever the host, so tunnelled traffic stays on
/// loopback; what the far end says first (within 50 ms) goes out in the
/// same write as the answer. A request naming a whole `http://host:port/` URL goes to
/// `127.0.0.2:port` the same way, in origin form, one per connection. A
/// CONNECT to an `auth.*` host is answered 407 until it comes with credentials
/// on a connection that was challenged (connection-bound authentication).
/// Anything else gets a 405. It records the head of every request it
/// answered.
pub struct ConnectProxy {
    pub addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

impl ConnectProxy {
    pub fn start(bind: SocketAddr) -> Self {
        let l = TcpListener::bind(bind).expect("bind the CONNECT proxy");
        let addr = l.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (seen, count) = (Arc::clone(&heads), Arc::clone(&accepted));
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let seen = Arc::clone(&seen);
                thread::spawn(move || {
                    let _ = Self::tunnel(s, &seen);
                });
            }
        });
        Self {
            addr,
            heads,
            accepted,
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The heads of the requests answered so far (request line and
    /// headers, as sent).
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    /// Reads one request head, byte by byte so that nothing after it is
    /// read here; None when the client closed or does not speak HTTP (a TLS
    /// ClientHello: this proxy speaks plaintext).
    fn read_head(client: &mut TcpStream) -> std::io::Result<Option<String>> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if client.read(&mut byte)? == 0 || head.len() > 16 * 1024 {
                return Ok(None);
            }
            if head.is_empty() && !byte[0].is_ascii_alphabetic() {
                return Ok(None);
            }
            head.push(byte[0]);
        }
        Ok(Some(String::from_utf8_lossy(&head).into_owned()))
    }

    fn tunnel(mut client: TcpStream, seen: &Mutex<Vec<String>>) -> std::io::Result<()> {
        let Some(mut head) = Self::read_head(&mut client)? else {
            return Ok(());
        };
        // `auth.*` hosts stand for a proxy that authenticates the connection
        // (as NTLM does): it takes credentials only on a connection it has
        // challenged with a 407 first.
        let mut challenged = false;
        while head.starts_with("CONNECT auth.")
            && !(challenged
                && head
                    .to_ascii_lowercase()
                    .contains("\r\nproxy-authorization:"))
        {
            client.write_all(
                b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n",
            )?;
            challenged = true;
            let Some(next) = Self::read_head(&mut client)? else {
                return Ok(());
            };
            head = next;
        }
        let mut words = head.split_whitespace();
        let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        // CONNECT host:port, or METHOD http://host:port/path.
        let (authority, path) = match target.strip_prefix("http://") {
            Some(rest) => rest.split_at(rest.find('/').unwrap_or(rest.len())),
            None if method == "CONNECT" => (target, ""),
            None => ("", ""),
        };
        let port = authority
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse::<u16>().ok());
        let Some(port) = port else {
            return client.write_all(
                b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        };
        let mut upstream = TcpStream::connect(SocketAddr::from(([127, 0, 0, 2], port)))?;
        if method == "CONNECT" {
            // What a far end that speaks first (SSH, SMTP) has said goes out
            // with the answer, in one write, as a busy proxy may send it.
            let mut early = vec![0u8; 4096];
            upstream.set_read_timeout(Some(std::time::Duration::from_millis(50)))?;
            let n = upstream.read(&mut early).unwrap_or(0);
            upstream.set_read_timeout(None)?;
            let mut answer = b"HTTP/1.1 200 Connection established\r\n\r\n".to_vec();
            answer.extend_from_slice(&early[..n]);
            client.write_all(&answer)?;
        } else {
            let path = if path.is_empty() { "/" } else { path };
            let origin_form = head.replacen(target, path, 1);
            upstream.write_all(origin_form.as_bytes())?;
        }
        seen.lock().unwrap().push(head);
        let (mut c2, mut u2) = (client.try_clone()?, upstream.try_clone()?);
        let up = thread::spawn(move || {
            let _ = std::io::copy(&mut c2, &mut u2);
            let _ = u2.shutdown(std::net::Shutdown::Write);
        });
        let (mut u, mut c) = (upstream, client);
        let _ = std::io::copy(&mut u, &mut c);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let _ = up.join();
        Ok(())
    }
}
