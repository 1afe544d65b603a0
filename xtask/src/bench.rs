//! `cargo xtask bench`: L4 passthrough cost, direct vs through Guard vs a
//! minimal relay ([`crate::bench_relay`]), in one run; then the HTTPS phases
//! of [`crate::bench_https`] (direct vs Guard vs minimal TLS and HTTP relays
//! vs mitmproxy) with the same agent. `--only l4|https|dlp` runs one part.
//!
//! What runs where:
//! - the **servers** run as threads in this xtask process (outside every
//!   monitored cgroup), bound to `127.0.0.2:<ephemeral>`; each phase and each
//!   mode gets fresh servers so TIME_WAIT tuples of one run never touch the
//!   next;
//! - the **agent** is the release build (`cargo build --release -p
//!   guard-agent`, or `GUARD_AGENT_BIN` if set, then nothing is built),
//!   started once through the shared harness with one monitored cgroup of
//!   the bench's own and `--intercept 127.0.0.2/32`;
//! - the **client** is this same binary's hidden `bench-client` subcommand:
//!   spawned with a plain `Command` for "direct" and with
//!   `guard_harness::command_in(cgroup, ..)` for "through Guard", so the very
//!   same code measures both. It times itself (process start-up is not
//!   measured) and prints one JSON line.
//!
//! What is measured (defaults; `--quick` shrinks the counts):
//! 1. **connect → first byte**: the server writes 1 byte on accept and
//!    closes; the client connects, reads 1 byte, closes; 200 warm-up then
//!    2000 sequential timed connections; p50/p90/p99 from the sorted samples
//!    (nearest rank). Through Guard this includes the redirect, the agent's
//!    accept, original-destination lookup, upstream connect and the splice.
//! 2. **short connections/s**: 4 client threads, 20000 connections in all,
//!    each: connect, send 64 B, read the 64 B answer, close.
//! 3. **stream**: one connection uploads 2 GiB (or as much as fits in 20 s)
//!    in 1 MiB writes to a sink that answers with the byte count at EOF;
//!    MiB/s = bytes / (connect .. count received).
//! 4. **CPU per connection** of the agent and of the minimal relay in the
//!    latency and short-connection phases: the sum of their threads'
//!    `schedstat` run time over the phase, divided by the connections made.
//! 5. **agent RSS**: `VmRSS` from `/proc/<agent>/status` 1 s after start-up
//!    (idle), the highest `VmRSS` sampled every 20 ms while the phases ran,
//!    and `VmHWM` at the end (and right after start-up, whose own peak,
//!    loading the kernel programs, it also covers), and `VmRSS` 1 s after
//!    the last run.
//!
//! Every figure is reported with its Guard/direct ratio, plus the issue's
//! targets with pass/fail: added p50 connect latency < 100 µs, stream
//! throughput ≥ 80 % of direct, idle RSS < 50 MiB. It is a report, not a
//! test: it exits 0 whatever the figures, non-zero only when something broke
//! (a client failed, Guard did not see the through-Guard connections, or saw
//! direct ones). The report goes to stdout and `<out>/l4.md`, the raw figures
//! to `<out>/l4.json` (`<out>` defaults to `target/bench`).
//!
//! Caveats: on a small machine clients, servers and the agent share the
//! same cores, so "direct" is the kernel's loopback path with no contention
//! from a third process; and `cargo xtask` builds this binary (client and
//! servers) with the dev profile; `cargo run --release -p xtask -- bench`
//! uses an optimised one. The report says which.
//!
//! Traffic goes only to 127.0.0.2 (the client refuses anything outside
//! 127.0.0.0/8).

use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context};
#[path = "bench_dlp.rs"]
mod dlp;
use guard_harness::{command_in, tls_server::TestCa, Agent, AgentOptions, TestCgroup};
use serde_json::{json, Value};

/// Options of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Small counts: a smoke run of a few seconds.
    #[arg(long)]
    quick: bool,
    /// Directory for l4.md, l4.json, https.md and https.json (default: <target>/bench).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run only this part (default: both).
    #[arg(long, value_enum)]
    only: Option<Part>,
    /// Timed HTTPS keep-alive requests per connection (default: 5000, 500
    /// with --quick). More gives steadier agent CPU figures, and shows the
    /// cost of writing into a store that keeps growing.
    #[arg(long)]
    keepalive_requests: Option<u64>,
    /// Timed HTTPS new connections per phase (default: 1000, 100 with
    /// --quick). More gives a handshake phase long enough to profile.
    #[arg(long)]
    handshakes: Option<u64>,
}

/// The parts of the bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// L4 passthrough: connect latency, short connections, stream.
    L4,
    /// HTTPS: keep-alive and new TLS connections, with mitmproxy.
    Https,
    /// DLP: detector pass vs naive vs detect-secrets; 64 KiB masking latency.
    Dlp,
}

/// What the hidden `bench-client` subcommand does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Sequential connect → read 1 byte → close.
    Latency,
    /// Concurrent connect → 64 B request → 64 B response → close.
    Rps,
    /// One upload of `--bytes` (bounded by `--max-secs`).
    Stream,
    /// HTTPS keep-alive GETs on `--threads` connections.
    HttpsKeepalive,
    /// HTTPS: a new connection (full handshake) per GET.
    HttpsHandshake,
    /// 64 KiB HTTP POSTs on one keep-alive connection (DLP masking cost).
    Http64k,
}

/// Options of the hidden `bench-client` subcommand (one JSON line out).
#[derive(clap::Args)]
pub struct ClientArgs {
    #[arg(long, value_enum)]
    mode: Mode,
    /// Server address; must be in 127.0.0.0/8.
    #[arg(long)]
    pub(crate) addr: SocketAddr,
    /// Timed connections (latency, rps) or requests (https-*).
    #[arg(long, default_value_t = 1000)]
    pub(crate) n: u64,
    /// Untimed connections first (latency, rps) or requests (https-*).
    #[arg(long, default_value_t = 0)]
    pub(crate) warmup: u64,
    /// Client threads (rps, https-*).
    #[arg(long, default_value_t = 4)]
    pub(crate) threads: u64,
    /// CA certificate (PEM) the HTTPS client trusts (https-*).
    #[arg(long)]
    pub(crate) ca: Option<PathBuf>,
    /// Bytes to upload (stream).
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Upper bound on the upload's duration (stream).
    #[arg(long, default_value_t = 20.0)]
    max_secs: f64,
    /// Put a card number in the body (http64k).
    #[arg(long)]
    card: bool,
}

/// Request and response size of the short-connection phase.
const MSG: usize = 64;
/// Write size of the stream phase.
const CHUNK: usize = 1 << 20;
/// How long a client may block on one socket operation.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- client

/// `xtask bench-client`: runs one workload and prints its figures as JSON.
pub fn client(a: ClientArgs) -> anyhow::Result<()> {
    match a.addr.ip() {
        IpAddr::V4(ip) if ip.octets()[0] == 127 => {}
        other => bail!("bench-client only talks to 127.0.0.0/8, not {other}"),
    }
    let out = match a.mode {
        Mode::Latency => latency_client(&a)?,
        Mode::Rps => rps_client(&a)?,
        Mode::Stream => stream_client(&a)?,
        Mode::HttpsKeepalive => crate::bench_https::keepalive_client(&a)?,
        Mode::HttpsHandshake => crate::bench_https::handshake_client(&a)?,
        Mode::Http64k => dlp::http_client(a.addr, a.n, a.warmup, a.card)?,
    };
    println!("{out}");
    Ok(())
}

fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One connect → first byte → close; the time until the byte arrived.
fn first_byte(addr: SocketAddr) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).context("read the first byte")?;
    let dt = t0.elapsed();
    drop(s);
    Ok(dt)
}

/// Nearest-rank percentile of sorted samples.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn latency_client(a: &ClientArgs) -> anyhow::Result<Value> {
    for _ in 0..a.warmup {
        first_byte(a.addr)?;
    }
    let mut us = Vec::with_capacity(a.n as usize);
    let t0 = Instant::now();
    for _ in 0..a.n {
        us.push(first_byte(a.addr)?.as_secs_f64() * 1e6);
    }
    let secs = t0.elapsed().as_secs_f64();
    us.sort_by(f64::total_cmp);
    Ok(json!({
        "mode": "latency",
        "n": a.n,
        "warmup": a.warmup,
        "connections": a.n + a.warmup,
        "operations": a.n + a.warmup,
        "secs": secs,
        "min_us": us.first(),
        "p50_us": percentile(&us, 50.0),
        "p90_us": percentile(&us, 90.0),
        "p99_us": percentile(&us, 99.0),
        "max_us": us.last(),
        "mean_us": us.iter().sum::<f64>() / us.len().max(1) as f64,
    }))
}

/// One connect → 64 B → 64 B back → close.
fn request(addr: SocketAddr, req: &[u8; MSG]) -> anyhow::Result<()> {
    let mut s = connect(addr)?;
    s.write_all(req).context("send the request")?;
    let mut resp = [0u8; MSG];
    s.read_exact(&mut resp).context("read the response")?;
    ensure!(resp == *req, "the response differs from the request");
    Ok(())
}

fn rps_client(a: &ClientArgs) -> anyhow::Result<Value> {
    let threads = a.threads.max(1);
    let req = [b'r'; MSG];
    for _ in 0..a.warmup {
        request(a.addr, &req)?;
    }
    let t0 = Instant::now();
    let results: Vec<anyhow::Result<()>> = thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                // Spread the remainder over the first threads.
                let n = a.n / threads + u64::from(i < a.n % threads);
                sc.spawn(move || (0..n).try_for_each(|_| request(a.addr, &req)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread panicked"))
            .collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(json!({
        "mode": "rps",
        "requests": a.n,
        "warmup": a.warmup,
        "connections": a.n + a.warmup,
        "operations": a.n + a.warmup,
        "threads": threads,
        "secs": secs,
        "rps": a.n as f64 / secs,
    }))
}

fn stream_client(a: &ClientArgs) -> anyhow::Result<Value> {
    let chunk: Vec<u8> = (0..CHUNK).map(|i| (i * 31 + 7) as u8).collect();
    let limit = Duration::from_secs_f64(a.max_secs);
    let t0 = Instant::now();
    let mut s = connect(a.addr)?;
    let mut sent = 0u64;
    while sent < a.bytes && t0.elapsed() < limit {
        let n = (a.bytes - sent).min(CHUNK as u64) as usize;
        s.write_all(&chunk[..n]).context("upload")?;
        sent += n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .context("read the sink's count")?;
    let secs = t0.elapsed().as_secs_f64();
    let got: u64 = answer
        .trim()
        .parse()
        .with_context(|| format!("the sink answered {answer:?}"))?;
    ensure!(got == sent, "sent {sent} bytes, the sink received {got}");
    Ok(json!({
        "mode": "stream",
        "bytes": sent,
        "time_bounded": sent < a.bytes,
        "connections": 1,
        "secs": secs,
        "mib_s": sent as f64 / (1 << 20) as f64 / secs,
    }))
}

// ---------------------------------------------------------------- servers

/// `workers` threads accepting on one listener bound to 127.0.0.2:0, each
/// running `handle` on the connections it accepts.
fn serve(workers: usize, handle: fn(TcpStream)) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.2:0").context("bind a server on 127.0.0.2")?;
    let addr = l.local_addr()?;
    for _ in 0..workers {
        let l = l.try_clone()?;
        thread::spawn(move || {
            for s in l.incoming().flatten() {
                let _ = s.set_nodelay(true);
                handle(s);
            }
        });
    }
    Ok(addr)
}

/// Writes one byte and closes.
fn first_byte_server() -> anyhow::Result<SocketAddr> {
    serve(2, |mut s| {
        let _ = s.write_all(&[1]);
    })
}

/// Reads 64 bytes, sends them back, waits for the client's close.
fn request_server() -> anyhow::Result<SocketAddr> {
    serve(8, |mut s| {
        let mut buf = [0u8; MSG];
        if s.read_exact(&mut buf).is_ok() && s.write_all(&buf).is_ok() {
            let _ = s.read(&mut buf);
        }
    })
}

/// Counts what it receives until EOF, then answers with the count.
fn sink_server() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.2:0").context("bind the sink on 127.0.0.2")?;
    let addr = l.local_addr()?;
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            thread::spawn(move || {
                let mut s = s;
                let mut buf = vec![0u8; CHUNK];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => total += n as u64,
                        Err(_) => return,
                    }
                }
                let _ = writeln!(s, "{total}");
            });
        }
    });
    Ok(addr)
}

// ---------------------------------------------------------------- bench

/// Direct, through the agent, or (HTTPS only) through mitmproxy.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    Direct,
    Guard,
    /// The client outside Guard's cgroup, talking to a mitmdump.
    Mitmproxy,
    /// The client outside Guard's cgroup, talking to the reference relay
    /// ([`crate::bench_relay`]).
    Relay,
    /// (HTTPS only) the client outside Guard's cgroup, talking to the
    /// reference relay in its HTTP mode ([`crate::bench_tls_relay`]).
    HttpRelay,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Guard => "guard",
            Via::Mitmproxy => "mitmproxy",
            Via::Relay => "relay",
            Via::HttpRelay => "http-relay",
        }
    }
}

/// Counts of one run.
struct Sizes {
    latency_n: u64,
    latency_warmup: u64,
    rps_n: u64,
    rps_warmup: u64,
    rps_threads: u64,
    stream_bytes: u64,
    stream_max_secs: f64,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Sizes {
                latency_n: 200,
                latency_warmup: 20,
                rps_n: 1000,
                rps_warmup: 20,
                rps_threads: 4,
                stream_bytes: 256 << 20,
                stream_max_secs: 5.0,
            }
        } else {
            Sizes {
                latency_n: 2000,
                latency_warmup: 200,
                rps_n: 20_000,
                rps_warmup: 200,
                rps_threads: 4,
                stream_bytes: 2 << 30,
                stream_max_secs: 20.0,
            }
        }
    }
}

/// A field of `/proc/<pid>/status` in KiB (VmRSS, VmHWM, ...).
pub(crate) fn proc_kib(pid: u32, field: &str) -> Option<u64> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    st.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU time of a process so far, in µs: the sum of its threads'
/// nanosecond run times (`/proc/PID/task/*/schedstat`); the clock-tick
/// figures of `/proc/PID/stat` (10 ms steps) when those are unavailable.
/// Threads that already exited are not in the sum: the agent's
/// long-lived threads do the work measured here.
fn proc_cpu_us(pid: u32) -> Option<f64> {
    let threads_ns = || -> Option<u64> {
        let mut ns = 0;
        for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
            let s = std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok()?;
            ns += s.split_whitespace().next()?.parse::<u64>().ok()?;
        }
        Some(ns)
    };
    if let Some(ns) = threads_ns() {
        return Some(ns as f64 / 1e3);
    }
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &st[st.rfind(')')? + 2..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: f64 = f.next()?.parse().ok()?;
    let stime: f64 = f.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) * 1e6 / hz)
}

/// Samples the agent's VmRSS until dropped; keeps the highest.
struct RssSampler {
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (Arc::clone(&peak_kib), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(kib) = proc_kib(pid, "VmRSS") {
                    p.fetch_max(kib, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        RssSampler {
            peak_kib,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak_kib.load(Ordering::Relaxed)
    }
}

/// The agent's connection counters.
fn counters(agent: &Agent) -> (u64, u64) {
    let st = agent.status();
    let c = &st["counters"];
    (
        c["redirected"].as_u64().unwrap_or(0),
        c["errors"].as_u64().unwrap_or(0),
    )
}

pub(crate) struct Bench {
    pub(crate) client_exe: PathBuf,
    cgroup: PathBuf,
    pub(crate) agent: Agent,
    /// Connections the agent reported as ending in an error, per phase.
    agent_errors: Vec<(String, u64)>,
}

impl Bench {
    /// Runs the client once; checks that the agent saw exactly the
    /// connections it should have. Through Guard, the figures include the
    /// agent's CPU time per operation (`proxy_cpu_us_per_op`).
    pub(crate) fn client(
        &mut self,
        via: Via,
        mode: &str,
        addr: SocketAddr,
        args: &[String],
    ) -> anyhow::Result<Value> {
        let proxy = (via == Via::Guard).then(|| self.agent.pid());
        self.client_through(via, proxy, mode, addr, args)
    }

    /// [`Self::client`], reporting the CPU time per operation of `proxy`
    /// (the agent, or a reference relay) when given.
    pub(crate) fn client_through(
        &mut self,
        via: Via,
        proxy: Option<u32>,
        mode: &str,
        addr: SocketAddr,
        args: &[String],
    ) -> anyhow::Result<Value> {
        let exe = self.client_exe.to_str().context("client path")?;
        let mut cmd = match via {
            Via::Direct | Via::Mitmproxy | Via::Relay | Via::HttpRelay => Command::new(exe),
            Via::Guard => command_in(&self.cgroup, exe),
        };
        cmd.arg("bench-client")
            .args(["--mode", mode, "--addr", &addr.to_string()])
            .args(args);
        let (red0, err0) = counters(&self.agent);
        eprintln!("bench: {mode} {} ...", via.name());
        let cpu0 = proxy.and_then(proc_cpu_us);
        let out = cmd.output().context("spawn bench-client")?;
        let cpu1 = proxy.and_then(proc_cpu_us);
        if !out.status.success() {
            bail!(
                "bench-client {mode} {} failed ({}): {}\nagent log:\n{}",
                via.name(),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.agent.log_text()
            );
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let mut v: Value = serde_json::from_str(line.trim())
            .with_context(|| format!("bench-client printed {line:?}"))?;
        // The proxy's CPU time per operation the client made (warm-up
        // included): on a shared machine a steadier figure than rates.
        if let (Some(c0), Some(c1), Some(ops)) = (cpu0, cpu1, v["operations"].as_u64()) {
            v["proxy_cpu_us_per_op"] = json!((c1 - c0) / ops.max(1) as f64);
        }
        let conns = v["connections"].as_u64().unwrap_or(0);
        let (red1, err1) = counters(&self.agent);
        let redirected = red1 - red0;
        match via {
            Via::Direct | Via::Mitmproxy | Via::Relay | Via::HttpRelay => ensure!(
                redirected == 0,
                "the {} {mode} run went through Guard ({redirected} connections redirected)",
                via.name()
            ),
            Via::Guard => ensure!(
                redirected == conns,
                "Guard redirected {redirected} of the {conns} connections of the {mode} run"
            ),
        }
        self.agent_errors
            .push((format!("{mode} {}", via.name()), err1 - err0));
        Ok(v)
    }

    /// The same workload direct, through Guard, then through the reference
    /// relay, each with a fresh server.
    fn triple(
        &mut self,
        mode: &str,
        server: fn() -> anyhow::Result<SocketAddr>,
        args: &[String],
    ) -> anyhow::Result<Phase> {
        let direct = self.client(Via::Direct, mode, server()?, args)?;
        let guard = self.client(Via::Guard, mode, server()?, args)?;
        let relay = crate::bench_relay::Relay::start(&self.client_exe, server()?)?;
        let relay = self.client_through(Via::Relay, Some(relay.pid()), mode, relay.addr, args)?;
        Ok(Phase {
            direct,
            guard,
            relay,
        })
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::root().join("target"))
}

/// `cargo xtask bench`.
pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    // The bench's clients and servers are this binary: an unoptimised build
    // would be the bottleneck and flatter every ratio. Rerun optimised.
    if cfg!(debug_assertions) {
        eprintln!(
            "bench: rebuilding xtask optimised, so that clients and servers are not the bottleneck"
        );
        return crate::run(
            crate::cargo()
                .args(["run", "--release", "--package", "xtask", "--"])
                .args(std::env::args_os().skip(1)),
        );
    }
    let started = Instant::now();
    let sizes = Sizes::new(a.quick);
    let out_dir = a.out.unwrap_or_else(|| target_dir().join("bench"));
    let agent_bin = match std::env::var_os("GUARD_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            crate::run(crate::cargo().args(["build", "--release", "--package", "guard-agent"]))?;
            let bin = target_dir().join("release/guard-agent");
            // Read by the harness; nothing else runs yet.
            std::env::set_var("GUARD_AGENT_BIN", &bin);
            bin
        }
    };
    ensure!(agent_bin.exists(), "{} not found", agent_bin.display());
    let wants = |part: Part| a.only.is_none() || a.only == Some(part);
    let scanner = if wants(Part::Dlp) {
        Some(dlp::build_scanner(&target_dir())?)
    } else {
        None
    };

    let cg = TestCgroup::new("bench");
    // The HTTPS server's CA, which the agent trusts upstream.
    let ca = TestCa::new();
    let agent = Agent::start(AgentOptions {
        cgroups: vec![cg.path.clone()],
        intercept: vec!["127.0.0.2/32".into()],
        extra_args: vec![
            "--upstream-root".into(),
            ca.pem_path().display().to_string(),
        ],
        ..Default::default()
    });
    let pid = agent.pid();
    let guard_ca = agent.ca_pem_path();
    thread::sleep(Duration::from_secs(1));
    let idle_kib = proc_kib(pid, "VmRSS").context("the agent's VmRSS")?;
    // Start-up (loading the kernel programs) has its own peak: keep it apart.
    let startup_hwm_kib = proc_kib(pid, "VmHWM").unwrap_or(0);

    let mut b = Bench {
        client_exe: std::env::current_exe()?,
        cgroup: cg.path.clone(),
        agent,
        agent_errors: Vec::new(),
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    if wants(Part::L4) {
        run_l4(
            &mut b,
            &sizes,
            a.quick,
            started,
            idle_kib,
            startup_hwm_kib,
            &out_dir,
        )?;
    }
    if wants(Part::Https) {
        let https = crate::bench_https::run(
            &mut b,
            &ca,
            guard_ca,
            a.quick,
            a.keepalive_requests,
            a.handshakes,
        )?;
        let md = https.markdown();
        print!("{md}");
        write(&out_dir.join("https.md"), md.as_bytes())?;
        write(
            &out_dir.join("https.json"),
            serde_json::to_string_pretty(&https.json())?.as_bytes(),
        )?;
        let errs: Vec<String> = b
            .agent_errors
            .iter()
            .filter(|(k, n)| k.starts_with("https") && *n > 0)
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        if !errs.is_empty() {
            eprintln!(
                "bench: connections the agent counted as errors: {}",
                errs.join(", ")
            );
        }
        eprintln!(
            "bench: wrote {} and {}",
            out_dir.join("https.md").display(),
            out_dir.join("https.json").display()
        );
    }
    let dlp_latency = match scanner {
        Some(_) => Some(dlp::latency(&mut b, if a.quick { 200 } else { 2000 })?),
        None => None,
    };
    drop(b);
    drop(cg);
    if let (Some(scanner), Some(dlp_latency)) = (scanner, dlp_latency) {
        // After the agent is gone: the detector passes have the cores alone.
        let dlp_tp = dlp::throughput(&scanner, &out_dir, a.quick)?;
        let dlp_md = dlp::markdown(&dlp_tp, &dlp_latency);
        print!("\n{dlp_md}");
        write(&out_dir.join("dlp.md"), dlp_md.as_bytes())?;
        write(
            &out_dir.join("dlp.json"),
            serde_json::to_string_pretty(&json!({"throughput": dlp_tp, "latency": dlp_latency}))?
                .as_bytes(),
        )?;
        eprintln!("bench: wrote {}", out_dir.join("dlp.md").display());
    }
    Ok(())
}

/// The L4 phases and their report (l4.md, l4.json).
fn run_l4(
    b: &mut Bench,
    sizes: &Sizes,
    quick: bool,
    started: Instant,
    idle_kib: u64,
    startup_hwm_kib: u64,
    out_dir: &Path,
) -> anyhow::Result<()> {
    let pid = b.agent.pid();
    let sampler = RssSampler::start(pid);
    let s = |v: &[(&str, String)]| -> Vec<String> {
        v.iter()
            .flat_map(|(k, v)| [format!("--{k}"), v.clone()])
            .collect()
    };
    let lat = b.triple(
        "latency",
        first_byte_server,
        &s(&[
            ("n", sizes.latency_n.to_string()),
            ("warmup", sizes.latency_warmup.to_string()),
        ]),
    )?;
    let rps = b.triple(
        "rps",
        request_server,
        &s(&[
            ("n", sizes.rps_n.to_string()),
            ("warmup", sizes.rps_warmup.to_string()),
            ("threads", sizes.rps_threads.to_string()),
        ]),
    )?;
    let stream = b.triple(
        "stream",
        sink_server,
        &s(&[
            ("bytes", sizes.stream_bytes.to_string()),
            ("max-secs", sizes.stream_max_secs.to_string()),
        ]),
    )?;
    let peak_kib = sampler.finish();
    let hwm_kib = proc_kib(pid, "VmHWM").unwrap_or(0);
    // Does the memory come back once the connections are gone?
    thread::sleep(Duration::from_secs(1));
    let after_kib = proc_kib(pid, "VmRSS").unwrap_or(0);
    let status = b.agent.status();

    let results = Results {
        quick,
        lat,
        rps,
        stream,
        idle_kib,
        startup_hwm_kib,
        peak_kib,
        hwm_kib,
        after_kib,
        agent_errors: b.agent_errors.clone(),
        agent_status: status,
        secs: started.elapsed().as_secs_f64(),
    };
    let md = results.markdown();
    print!("{md}");
    write(&out_dir.join("l4.md"), md.as_bytes())?;
    write(
        &out_dir.join("l4.json"),
        serde_json::to_string_pretty(&results.json())?.as_bytes(),
    )?;
    eprintln!(
        "bench: wrote {} and {}",
        out_dir.join("l4.md").display(),
        out_dir.join("l4.json").display()
    );
    Ok(())
}

fn write(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, data).with_context(|| format!("write {}", path.display()))
}

// ---------------------------------------------------------------- report

/// One L4 workload's figures: direct, through Guard, through the reference
/// relay.
struct Phase {
    direct: Value,
    guard: Value,
    relay: Value,
}

impl Phase {
    /// The figures through Guard or through the relay.
    fn via(&self, via: Via) -> &Value {
        match via {
            Via::Relay => &self.relay,
            _ => &self.guard,
        }
    }

    fn ratio(&self, via: Via, k: &str) -> f64 {
        f(self.via(via), k) / f(&self.direct, k)
    }

    fn added(&self, via: Via, k: &str) -> f64 {
        f(self.via(via), k) - f(&self.direct, k)
    }
}

struct Results {
    quick: bool,
    lat: Phase,
    rps: Phase,
    stream: Phase,
    idle_kib: u64,
    startup_hwm_kib: u64,
    peak_kib: u64,
    hwm_kib: u64,
    after_kib: u64,
    agent_errors: Vec<(String, u64)>,
    agent_status: Value,
    secs: f64,
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

/// Limits from the issue.
const ADDED_P50_MAX_US: f64 = 100.0;
const STREAM_MIN_RATIO: f64 = 0.80;
const IDLE_RSS_MAX_MIB: f64 = 50.0;

impl Results {
    fn added_p50_us(&self) -> f64 {
        self.lat.added(Via::Guard, "p50_us")
    }

    fn stream_ratio(&self) -> f64 {
        self.stream.ratio(Via::Guard, "mib_s")
    }

    fn targets(&self) -> [(&'static str, String, bool); 3] {
        let added = self.added_p50_us();
        let ratio = self.stream_ratio();
        let idle = mib(self.idle_kib);
        [
            (
                "added connect latency p50 < 100 µs",
                format!("{added:.1} µs"),
                added < ADDED_P50_MAX_US,
            ),
            (
                "stream throughput ≥ 80% of direct",
                format!("{:.1}%", ratio * 100.0),
                ratio >= STREAM_MIN_RATIO,
            ),
            (
                "agent idle RSS < 50 MiB",
                format!("{idle:.1} MiB"),
                idle < IDLE_RSS_MAX_MIB,
            ),
        ]
    }

    fn markdown(&self) -> String {
        let row = |name: &str, p: &Phase, k: &str, prec: usize| {
            let (d, g, r) = (f(&p.direct, k), f(&p.guard, k), f(&p.relay, k));
            format!(
                "| {name} | {d:.prec$} | {g:.prec$} | {r:.prec$} | {:.2}× | {:.2}× |\n",
                g / d,
                r / d,
                prec = prec
            )
        };
        let mut m = String::new();
        m += "# Guard L4 passthrough: direct vs through Guard vs a minimal relay\n\n";
        m += &format!(
            "{} run; kernel {}; {} CPUs; agent: release build; client, servers and minimal relay: {} build; {:.0} s in all.\n\n",
            if self.quick { "Quick (--quick)" } else { "Full" },
            kernel(),
            thread::available_parallelism().map_or(0, |n| n.get()),
            if cfg!(debug_assertions) { "dev (unoptimised)" } else { "release" },
            self.secs,
        );
        m += "The minimal relay is the least a user-space relay can do (a process of \
              its own, worker threads blocking in accept, splice(2) and poll, nothing \
              looked up or recorded): the floor any relay pays on this machine.\n\n";
        m += "| metric | direct | through Guard | minimal relay | Guard/direct | relay/direct |\n";
        m += "|---|---:|---:|---:|---:|---:|\n";
        m += &row("connect → first byte p50 (µs)", &self.lat, "p50_us", 1);
        m += &row("connect → first byte p90 (µs)", &self.lat, "p90_us", 1);
        m += &row("connect → first byte p99 (µs)", &self.lat, "p99_us", 1);
        m += &row("connect → first byte mean (µs)", &self.lat, "mean_us", 1);
        m += &format!(
            "| added connect latency p50 / p99 (µs) | | {:.1} / {:.1} | {:.1} / {:.1} | | |\n",
            self.lat.added(Via::Guard, "p50_us"),
            self.lat.added(Via::Guard, "p99_us"),
            self.lat.added(Via::Relay, "p50_us"),
            self.lat.added(Via::Relay, "p99_us"),
        );
        m += &row(
            &format!(
                "short connections, {} threads (req/s)",
                self.rps.direct["threads"]
            ),
            &self.rps,
            "rps",
            0,
        );
        m += &row(
            &format!(
                "stream upload, {:.0} MiB (MiB/s)",
                f(&self.stream.direct, "bytes") / (1 << 20) as f64
            ),
            &self.stream,
            "mib_s",
            0,
        );
        m += &format!(
            "| CPU per connection of the agent / relay, latency / short connections (µs) | | {:.1} / {:.1} | {:.1} / {:.1} | | |\n",
            f(&self.lat.guard, "proxy_cpu_us_per_op"),
            f(&self.rps.guard, "proxy_cpu_us_per_op"),
            f(&self.lat.relay, "proxy_cpu_us_per_op"),
            f(&self.rps.relay, "proxy_cpu_us_per_op"),
        );
        m += &format!(
            "| agent RSS idle (MiB) | | {:.1} | | | |\n",
            mib(self.idle_kib)
        );
        m += &format!(
            "| agent RSS under load: peak sampled / VmHWM (MiB) | | {:.1} / {:.1} | | | |\n\
             | agent RSS 1 s after the last run (MiB) | | {:.1} | | | |\n\n\
             (VmHWM covers the agent's whole life; it was {:.1} MiB right after start-up.)\n\n",
            mib(self.peak_kib),
            mib(self.hwm_kib),
            mib(self.after_kib),
            mib(self.startup_hwm_kib)
        );
        m += "| target | measured | result |\n|---|---:|:---:|\n";
        for (name, got, ok) in self.targets() {
            m += &format!("| {name} | {got} | {} |\n", pass(ok));
        }
        m += &format!(
            "\nCounts: {} timed connections after {} warm-up (latency); {} connections, {} threads (short connections); 1 connection, {} bytes{} (stream).\n",
            self.lat.direct["n"],
            self.lat.direct["warmup"],
            self.rps.direct["requests"],
            self.rps.direct["threads"],
            self.stream.guard["bytes"],
            if [&self.stream.direct, &self.stream.guard, &self.stream.relay]
                .iter()
                .any(|v| v["time_bounded"] == true)
            {
                " (time-bounded)"
            } else {
                ""
            },
        );
        let errs: Vec<String> = self
            .agent_errors
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        m += &format!(
            "Guard redirected {} connections; connections the agent counted as errors: {}.\n",
            self.agent_status["counters"]["redirected"],
            if errs.is_empty() {
                "none".to_owned()
            } else {
                errs.join(", ")
            }
        );
        m
    }

    fn json(&self) -> Value {
        let phase = |p: &Phase| json!({"direct": p.direct, "guard": p.guard, "relay": p.relay});
        json!({
            "quick": self.quick,
            "kernel": kernel(),
            "cpus": thread::available_parallelism().map_or(0, |n| n.get()),
            "client_build": if cfg!(debug_assertions) { "dev" } else { "release" },
            "secs": self.secs,
            "latency": phase(&self.lat),
            "rps": phase(&self.rps),
            "stream": phase(&self.stream),
            "agent_rss_kib": {
                "idle": self.idle_kib,
                "vm_hwm_after_startup": self.startup_hwm_kib,
                "peak_sampled": self.peak_kib,
                "vm_hwm": self.hwm_kib,
                "after_load": self.after_kib,
            },
            "ratios": {
                "latency_p50": self.lat.ratio(Via::Guard, "p50_us"),
                "latency_p99": self.lat.ratio(Via::Guard, "p99_us"),
                "rps": self.rps.ratio(Via::Guard, "rps"),
                "stream": self.stream_ratio(),
            },
            "relay_ratios": {
                "latency_p50": self.lat.ratio(Via::Relay, "p50_us"),
                "latency_p99": self.lat.ratio(Via::Relay, "p99_us"),
                "rps": self.rps.ratio(Via::Relay, "rps"),
                "stream": self.stream.ratio(Via::Relay, "mib_s"),
                "added_latency_p50_us": self.lat.added(Via::Relay, "p50_us"),
            },
            "targets": self.targets().iter().map(|(name, got, ok)| json!({
                "target": name, "measured": got, "pass": ok,
            })).collect::<Vec<_>>(),
            "agent_errors": self.agent_errors.iter().map(|(k, n)| json!({"run": k, "errors": n})).collect::<Vec<_>>(),
            "agent_counters": self.agent_status["counters"],
        })
    }
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}
