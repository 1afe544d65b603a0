//! The HTTPS part of `cargo xtask bench`: keep-alive requests and new TLS
//! connections, direct vs through Guard vs minimal TLS and HTTP relays vs
//! through mitmproxy, in one run.
//!
//! What runs where:
//! - the **server** is the tests' TLS server (`guard_harness::tls_server`:
//!   rustls, ECDSA P-256 certificate from a test CA, hyper), on
//!   `127.0.0.2:<ephemeral>`, fresh for each phase and mode; it answers
//!   every `GET` with a small JSON body (Content-Length);
//! - **Guard** is the bench's agent (told to trust the test CA upstream with
//!   `--upstream-root`); the client runs in the bench's monitored cgroup and
//!   trusts the Guard CA;
//! - the **minimal TLS relay** ([`crate::bench_tls_relay`]) is a process of
//!   its own, outside every monitored cgroup, started per phase in front of
//!   that phase's server: TLS terminated with a leaf from the test CA (the
//!   client trusts the test CA, as direct), TLS re-originated to the server,
//!   plaintext copied both ways. It is the floor any TLS-terminating relay
//!   pays on this machine; the report gives its CPU per operation next to
//!   the agent's;
//! - the **minimal HTTP relay** is the same process in its `--http` mode,
//!   started the same way: hyper's HTTP/1.1 server and client on the two
//!   legs, every request handed across untouched. It is the floor of a
//!   relay that reads requests with hyper, as Guard does, before any
//!   inspection or record;
//! - **mitmproxy** is Debian's `mitmdump`, started per phase in reverse-proxy
//!   mode on 127.0.0.3 (`--mode reverse:https://127.0.0.2:PORT
//!   --ssl-insecure`), outside every monitored cgroup; the client trusts
//!   its CA (a fresh confdir per run). When `mitmdump` is not installed the
//!   report says so and the other columns are still measured;
//! - the **client** is this binary's `bench-client` (sync rustls, HTTP/1.1
//!   by hand, ALPN http/1.1, TLS session resumption disabled so every new
//!   connection is a full handshake).
//!
//! Phases: (1) keep-alive, one connection, sequential `GET`s: per-request
//! latency p50/p99 and requests/s; (2) keep-alive, 4 connections on 4
//! threads: requests/s; (3) new connection per request, sequential: the
//! time from `connect()` to the end of the response (TCP + full TLS
//! handshake + one request) and connections/s; (4) the same on 4 threads:
//! connections/s. For each Guard and relay run the report also gives the
//! agent's and the relay's CPU time (their threads' `schedstat` run time)
//! per request or per new connection, warm-up included: on a shared machine
//! a steadier figure than rates. The upstream legs use each proxy's own defaults (Guard
//! keeps TLS sessions to upstreams; mitmproxy's OpenSSL may too): what a
//! client sees is what is measured.
//!
//! Traffic goes only to 127.0.0.2 and 127.0.0.3.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context};
use guard_harness::{
    external_v4,
    tls_server::{CertKind, TestCa, TlsServer},
};
use rustls::{
    client::Resumption,
    pki_types::{pem::PemObject, CertificateDer, ServerName},
    ClientConfig, ClientConnection, RootCertStore, StreamOwned,
};
use serde_json::{json, Value};

use crate::bench::{percentile, proc_kib, Bench, ClientArgs, Via};
use crate::bench_tls_relay::RelayLevel;

/// The name the client asks for (covered by the test server's certificate).
const SNI: &str = "api.test";
const IO_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- client

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// The certificates in a PEM file.
pub(crate) fn pem_certs(p: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(p)
        .with_context(|| format!("read {}", p.display()))?
        .map(|c| c.with_context(|| format!("a certificate in {}", p.display())))
        .collect()
}

/// A TLS client that trusts the CA in `ca` (PEM) and offers ALPN
/// http/1.1: the bench client's, and the minimal TLS relay's upstream leg.
pub(crate) fn http1_client_config(ca: &Path) -> anyhow::Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in pem_certs(ca)? {
        roots.add(c)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

fn client_config(ca: &Path) -> anyhow::Result<Arc<ClientConfig>> {
    let mut cfg = http1_client_config(ca)?;
    // Every new connection is a full handshake.
    cfg.resumption = Resumption::disabled();
    Ok(Arc::new(cfg))
}

fn tls_connect(cfg: &Arc<ClientConfig>, addr: SocketAddr) -> anyhow::Result<Tls> {
    let tcp = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))?;
    let conn = ClientConnection::new(Arc::clone(cfg), ServerName::try_from(SNI)?)?;
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).context("TLS handshake")?;
    }
    Ok(s)
}

const REQUEST: &[u8] = b"GET /bench HTTP/1.1\r\nHost: api.test\r\nUser-Agent: guard-bench\r\n\r\n";

/// Sends one GET and reads its whole response (Content-Length framing).
fn get(s: &mut Tls, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    s.write_all(REQUEST).context("send the request")?;
    s.flush()?;
    buf.clear();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).context("read the response")?;
        ensure!(n > 0, "the connection closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head")?;
    ensure!(
        head.starts_with("HTTP/1.1 200"),
        "unexpected response: {}",
        head.lines().next().unwrap_or("")
    );
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .context("no Content-Length in the response")?;
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).context("read the response body")?;
        ensure!(n > 0, "the connection closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

fn close(mut s: Tls) {
    s.conn.send_close_notify();
    let _ = s.conn.complete_io(&mut s.sock);
}

fn split(n: u64, threads: u64, i: u64) -> u64 {
    n / threads + u64::from(i < n % threads)
}

/// `operations`: requests (keep-alive) or connections (handshake) made in
/// all, warm-up included.
fn summary(
    mode: &str,
    a: &ClientArgs,
    us: &mut [f64],
    secs: f64,
    connections: u64,
    operations: u64,
) -> Value {
    us.sort_by(f64::total_cmp);
    json!({
        "mode": mode,
        "n": a.n,
        "warmup": a.warmup,
        "threads": a.threads,
        "connections": connections,
        "operations": operations,
        "secs": secs,
        "per_s": a.n as f64 / secs,
        "p50_us": percentile(us, 50.0),
        "p90_us": percentile(us, 90.0),
        "p99_us": percentile(us, 99.0),
        "mean_us": us.iter().sum::<f64>() / us.len().max(1) as f64,
    })
}

/// `--threads` connections, each: `--warmup` untimed then its share of
/// `--n` timed sequential GETs.
pub fn keepalive_client(a: &ClientArgs) -> anyhow::Result<Value> {
    let cfg = client_config(a.ca.as_deref().context("--ca is required")?)?;
    let threads = a.threads.max(1);
    let mut conns = Vec::new();
    for _ in 0..threads {
        let mut s = tls_connect(&cfg, a.addr)?;
        let mut buf = Vec::new();
        for _ in 0..a.warmup {
            get(&mut s, &mut buf)?;
        }
        conns.push(s);
    }
    let t0 = Instant::now();
    let results: Vec<anyhow::Result<(Vec<f64>, Tls)>> = thread::scope(|sc| {
        let handles: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, mut s)| {
                let n = split(a.n, threads, i as u64);
                sc.spawn(move || {
                    let mut buf = Vec::with_capacity(16 << 10);
                    let mut us = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        let t = Instant::now();
                        get(&mut s, &mut buf)?;
                        us.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                    Ok((us, s))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread panicked"))
            .collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let mut all = Vec::new();
    for r in results {
        let (us, s) = r?;
        all.extend(us);
        close(s);
    }
    Ok(summary(
        "https-keepalive",
        a,
        &mut all,
        secs,
        threads,
        a.n + a.warmup * threads,
    ))
}

/// `--threads` threads, each: its share of `--n` new connections (full
/// handshake, one GET, close), after `--warmup` untimed ones in all.
pub fn handshake_client(a: &ClientArgs) -> anyhow::Result<Value> {
    let cfg = client_config(a.ca.as_deref().context("--ca is required")?)?;
    let threads = a.threads.max(1);
    let one = |buf: &mut Vec<u8>| -> anyhow::Result<f64> {
        let t = Instant::now();
        let mut s = tls_connect(&cfg, a.addr)?;
        get(&mut s, buf)?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        close(s);
        Ok(us)
    };
    let mut buf = Vec::new();
    for _ in 0..a.warmup {
        one(&mut buf)?;
    }
    let t0 = Instant::now();
    let results: Vec<anyhow::Result<Vec<f64>>> = thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let n = split(a.n, threads, i);
                let one = &one;
                sc.spawn(move || {
                    let mut buf = Vec::with_capacity(16 << 10);
                    (0..n).map(|_| one(&mut buf)).collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread panicked"))
            .collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let mut all = Vec::new();
    for r in results {
        all.extend(r?);
    }
    Ok(summary(
        "https-handshake",
        a,
        &mut all,
        secs,
        a.n + a.warmup,
        a.n + a.warmup,
    ))
}

// ---------------------------------------------------------------- mitmproxy

/// A `mitmdump` in reverse-proxy mode in front of one server; killed on drop.
struct Mitmdump {
    child: Child,
    addr: SocketAddr,
}

impl Mitmdump {
    fn installed() -> bool {
        Command::new("mitmdump")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn version() -> String {
        Command::new("mitmdump")
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(|l| l.trim().trim_start_matches("Mitmproxy:").trim().to_owned())
            })
            .unwrap_or_default()
    }

    fn start(upstream: SocketAddr, confdir: &Path) -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.3:0")
            .context("find a free port on 127.0.0.3")?
            .local_addr()?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 3], port));
        let child = Command::new("mitmdump")
            .args([
                "--mode",
                &format!("reverse:https://{upstream}"),
                "--listen-host",
                "127.0.0.3",
                "--listen-port",
                &port.to_string(),
                "--ssl-insecure",
                "--set",
                &format!("confdir={}", confdir.display()),
                "-q",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start mitmdump")?;
        let mut m = Mitmdump { child, addr };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = m.child.try_wait()? {
                bail!("mitmdump exited at start-up ({st})");
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(m);
            }
            ensure!(
                Instant::now() < deadline,
                "mitmdump did not listen on {addr}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Mitmdump {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- phases

/// Figures of one phase: direct, Guard, the minimal TLS relay, the minimal
/// HTTP relay, mitmproxy (None: not measured).
pub struct Triple {
    pub direct: Value,
    pub guard: Value,
    pub relay: Value,
    pub http_relay: Value,
    pub mitm: Option<Value>,
}

pub struct HttpsResults {
    pub quick: bool,
    pub mitm_version: Option<String>,
    pub keepalive_1: Triple,
    pub keepalive_4: Triple,
    pub handshake_1: Triple,
    pub handshake_4: Triple,
    /// The agent's RSS and VmHWM (KiB) at the end: after every request of
    /// the run was recorded in its store.
    pub agent_rss_kib: Option<(u64, u64)>,
    /// The agent's RSS (KiB) after [`QUIET_WAIT`] with no traffic: what it
    /// keeps once a busy period is over.
    pub agent_rss_quiet_kib: Option<u64>,
}

/// How long the bench leaves the agent idle before reading its RSS again:
/// two of the agent's quiet checks (`allocator::QUIET_CHECK`, 10 s) and
/// some slack, so that it has seen one quiet window and trimmed.
const QUIET_WAIT: Duration = Duration::from_secs(22);

struct Setup<'a> {
    ca: &'a TestCa,
    guard_ca: PathBuf,
    mitm_confdir: Option<PathBuf>,
    /// The minimal TLS relay's certificate and key (PEM files).
    relay_cert: PathBuf,
    relay_key: PathBuf,
}

fn triple(b: &mut Bench, s: &Setup, mode: &str, args: &[String]) -> anyhow::Result<Triple> {
    let with_ca = |ca: &Path| -> Vec<String> {
        let mut v = args.to_vec();
        v.extend(["--ca".into(), ca.display().to_string()]);
        v
    };
    let server = || TlsServer::start(external_v4(0), s.ca, CertKind::Valid);
    let direct = b.client(Via::Direct, mode, server().addr, &with_ca(s.ca.pem_path()))?;
    let guard = b.client(Via::Guard, mode, server().addr, &with_ca(&s.guard_ca))?;
    let mut relay = |via: Via, level: RelayLevel| -> anyhow::Result<Value> {
        let up = server();
        let r = crate::bench_tls_relay::start(
            &b.client_exe,
            up.addr,
            (&s.relay_cert, &s.relay_key),
            s.ca.pem_path(),
            SNI,
            level,
        )?;
        b.client_through(via, Some(r.pid()), mode, r.addr, &with_ca(s.ca.pem_path()))
    };
    let (relay, http_relay) = (
        relay(Via::Relay, RelayLevel::Bytes)?,
        relay(Via::HttpRelay, RelayLevel::Http)?,
    );
    let mitm = match &s.mitm_confdir {
        Some(conf) => {
            let up = server();
            let m = Mitmdump::start(up.addr, conf)?;
            let v = b.client(
                Via::Mitmproxy,
                mode,
                m.addr,
                &with_ca(&conf.join("mitmproxy-ca-cert.pem")),
            )?;
            Some(v)
        }
        None => None,
    };
    Ok(Triple {
        direct,
        guard,
        relay,
        http_relay,
        mitm,
    })
}

/// Runs the HTTPS phases with the bench's agent (which must trust `ca`
/// upstream).
pub fn run(
    b: &mut Bench,
    ca: &TestCa,
    guard_ca: PathBuf,
    quick: bool,
    keepalive_requests: Option<u64>,
    handshakes: Option<u64>,
) -> anyhow::Result<HttpsResults> {
    let tmp = std::env::temp_dir().join(format!("guard-bench-https-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let (relay_cert, relay_key) = (tmp.join("relay-cert.pem"), tmp.join("relay-key.pem"));
    let (cert, key) = ca.issue_pem(&[SNI]);
    std::fs::write(&relay_cert, cert)?;
    write_private(&relay_key, key.as_bytes())?;
    let mitm = tmp.join("mitmproxy");
    let (mitm_confdir, mitm_version) = if Mitmdump::installed() {
        std::fs::create_dir_all(&mitm)?;
        (Some(mitm), Some(Mitmdump::version()))
    } else {
        eprintln!(
            "bench: mitmproxy: not installed (apt install mitmproxy); its column is left out"
        );
        (None, None)
    };
    let s = Setup {
        ca,
        guard_ca,
        mitm_confdir,
        relay_cert,
        relay_key,
    };
    let (ka_n, ka_warm, hs_n, hs_warm) = if quick {
        (500, 20, 100, 5)
    } else {
        (5000, 200, 1000, 20)
    };
    let ka_n = keepalive_requests.unwrap_or(ka_n);
    let hs_n = handshakes.unwrap_or(hs_n);
    let a = |n: u64, warm: u64, threads: u64| -> Vec<String> {
        vec![
            "--n".into(),
            n.to_string(),
            "--warmup".into(),
            warm.to_string(),
            "--threads".into(),
            threads.to_string(),
        ]
    };
    let res = (|| {
        Ok::<_, anyhow::Error>(HttpsResults {
            quick,
            mitm_version,
            keepalive_1: triple(b, &s, "https-keepalive", &a(ka_n, ka_warm, 1))?,
            keepalive_4: triple(b, &s, "https-keepalive", &a(ka_n, ka_warm, 4))?,
            handshake_1: triple(b, &s, "https-handshake", &a(hs_n, hs_warm, 1))?,
            handshake_4: triple(b, &s, "https-handshake", &a(hs_n, hs_warm, 4))?,
            agent_rss_kib: proc_kib(b.agent.pid(), "VmRSS").zip(proc_kib(b.agent.pid(), "VmHWM")),
            agent_rss_quiet_kib: {
                eprintln!("bench: agent idle for {} s ...", QUIET_WAIT.as_secs());
                thread::sleep(QUIET_WAIT);
                proc_kib(b.agent.pid(), "VmRSS")
            },
        })
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    res
}

/// Writes a key file only its owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .with_context(|| format!("write {}", path.display()))
}

// ---------------------------------------------------------------- report

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

/// Limits from issue 5.
const KEEPALIVE_MIN_RATIO: f64 = 0.5;
const HANDSHAKE_MIN_RATIO: f64 = 0.5;
const ADDED_P50_MAX_US: f64 = 200.0;

impl HttpsResults {
    fn added_p50(&self) -> f64 {
        f(&self.keepalive_1.guard, "p50_us") - f(&self.keepalive_1.direct, "p50_us")
    }

    pub fn targets(&self) -> [(&'static str, String, bool); 3] {
        let ka = f(&self.keepalive_4.guard, "per_s") / f(&self.keepalive_4.direct, "per_s");
        let hs = f(&self.handshake_4.guard, "per_s") / f(&self.handshake_4.direct, "per_s");
        let added = self.added_p50();
        [
            (
                "keep-alive requests/s ≥ 50% of direct (4 connections)",
                format!("{:.1}%", ka * 100.0),
                ka >= KEEPALIVE_MIN_RATIO,
            ),
            (
                "new TLS connections/s ≥ 50% of direct full handshakes (4 threads)",
                format!("{:.1}%", hs * 100.0),
                hs >= HANDSHAKE_MIN_RATIO,
            ),
            (
                "added latency per keep-alive request p50 < 200 µs",
                format!("{added:.1} µs"),
                added < ADDED_P50_MAX_US,
            ),
        ]
    }

    pub fn markdown(&self) -> String {
        let row = |name: &str, t: &Triple, k: &str, prec: usize| -> String {
            let d = f(&t.direct, k);
            let g = f(&t.guard, k);
            let r = f(&t.relay, k);
            let h = f(&t.http_relay, k);
            let (m, gm, md) = match &t.mitm {
                Some(m) => {
                    let m = f(m, k);
                    (
                        format!("{m:.prec$}"),
                        format!("{:.2}×", g / m),
                        format!("{:.3}×", m / d),
                    )
                }
                None => ("-".into(), "-".into(), "-".into()),
            };
            format!(
                "| {name} | {d:.prec$} | {g:.prec$} | {r:.prec$} | {h:.prec$} | {m} | {:.2}× | {:.2}× | {:.2}× | {md} | {gm} |\n",
                g / d,
                r / d,
                h / d,
            )
        };
        let mut m = String::new();
        m += "# Guard HTTPS: direct vs through Guard vs minimal TLS and HTTP relays vs through mitmproxy\n\n";
        m += &format!(
            "{} run; {} CPUs; client: sync rustls, HTTP/1.1, TLS session resumption off; server: rustls + hyper, ECDSA P-256; mitmproxy {}.\n\n",
            if self.quick { "Quick (--quick)" } else { "Full" },
            thread::available_parallelism().map_or(0, |n| n.get()),
            self.mitm_version
                .as_deref()
                .unwrap_or("not installed (apt install mitmproxy)"),
        );
        m += "The minimal TLS relay (`xtask bench-tls-relay`, a process of its own) terminates \
              the client's TLS with one fixed certificate, re-originates TLS to the server and \
              copies plaintext both ways (tokio-rustls, `copy_bidirectional`): no HTTP, no \
              inspection, no records. It is the floor any TLS-terminating relay pays on this \
              machine. The minimal HTTP relay (the same process with `--http`) puts hyper's \
              HTTP/1.1 server on the client's leg and its client on the upstream's, and hands \
              each request across as it came: the floor of any relay that reads requests with \
              hyper, as Guard does, before it inspects or records anything.\n\n";
        m += "| metric | direct | through Guard | minimal TLS relay | minimal HTTP relay | through mitmproxy | Guard/direct | TLS relay/direct | HTTP relay/direct | mitmproxy/direct | Guard/mitmproxy |\n";
        m += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
        m += &row(
            "keep-alive, 1 connection (req/s)",
            &self.keepalive_1,
            "per_s",
            0,
        );
        m += &row(
            "keep-alive request p50 (µs)",
            &self.keepalive_1,
            "p50_us",
            1,
        );
        m += &row(
            "keep-alive request p99 (µs)",
            &self.keepalive_1,
            "p99_us",
            1,
        );
        m += &row(
            "keep-alive, 4 connections (req/s)",
            &self.keepalive_4,
            "per_s",
            0,
        );
        m += &row(
            "new connection + 1 request p50 (µs)",
            &self.handshake_1,
            "p50_us",
            0,
        );
        m += &row(
            "new connection + 1 request p99 (µs)",
            &self.handshake_1,
            "p99_us",
            0,
        );
        m += &row("new connections/s, 1 thread", &self.handshake_1, "per_s", 0);
        m += &row(
            "new connections/s, 4 threads",
            &self.handshake_4,
            "per_s",
            0,
        );
        let added = |v: &Value| f(v, "p50_us") - f(&self.keepalive_1.direct, "p50_us");
        let added_m = self
            .keepalive_1
            .mitm
            .as_ref()
            .map(|v| format!("{:.1}", added(v)))
            .unwrap_or_else(|| "-".into());
        m += &format!(
            "| added latency per keep-alive request p50 (µs) | | {:.1} | {:.1} | {:.1} | {added_m} | | | | | |\n",
            self.added_p50(),
            added(&self.keepalive_1.relay),
            added(&self.keepalive_1.http_relay),
        );
        let cpu = |t: &Triple| {
            (
                f(&t.guard, "proxy_cpu_us_per_op"),
                f(&t.relay, "proxy_cpu_us_per_op"),
                f(&t.http_relay, "proxy_cpu_us_per_op"),
            )
        };
        let (g, r, h) = cpu(&self.keepalive_4);
        m += &format!(
            "| CPU of the agent / relay per keep-alive request, 4 connections (µs) | | {g:.1} | {r:.1} | {h:.1} | | | | | | |\n"
        );
        let (g, r, h) = cpu(&self.handshake_4);
        m += &format!(
            "| CPU of the agent / relay per new connection + 1 request, 4 threads (µs) | | {g:.1} | {r:.1} | {h:.1} | | | | | | |\n\n"
        );
        if let Some((rss, hwm)) = self.agent_rss_kib {
            m += &format!(
                "Agent RSS at the end of the run: {:.1} MiB (VmHWM {:.1} MiB); after {} s without traffic: {}.\n\n",
                rss as f64 / 1024.0,
                hwm as f64 / 1024.0,
                QUIET_WAIT.as_secs(),
                self.agent_rss_quiet_kib
                    .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        m += "| target | measured | result |\n|---|---:|:---:|\n";
        for (name, got, ok) in self.targets() {
            m += &format!(
                "| {name} | {got} | {} |\n",
                if ok { "PASS" } else { "FAIL" }
            );
        }
        m += &format!(
            "\nCounts: keep-alive {} timed requests after {} warm-up per connection; new connections {} timed after {} warm-up.\n",
            self.keepalive_1.direct["n"],
            self.keepalive_1.direct["warmup"],
            self.handshake_1.direct["n"],
            self.handshake_1.direct["warmup"],
        );
        m
    }

    pub fn json(&self) -> Value {
        let t = |t: &Triple| json!({"direct": t.direct, "guard": t.guard, "tls_relay": t.relay, "http_relay": t.http_relay, "mitmproxy": t.mitm});
        json!({
            "quick": self.quick,
            "mitmproxy": self.mitm_version,
            "keepalive_1": t(&self.keepalive_1),
            "keepalive_4": t(&self.keepalive_4),
            "handshake_1": t(&self.handshake_1),
            "handshake_4": t(&self.handshake_4),
            "agent_rss_kib": self.agent_rss_kib.map(|(rss, hwm)| json!({"rss": rss, "hwm": hwm, "quiet": self.agent_rss_quiet_kib})),
            "targets": self.targets().iter().map(|(name, got, ok)| json!({
                "target": name, "measured": got, "pass": ok,
            })).collect::<Vec<_>>(),
        })
    }
}
