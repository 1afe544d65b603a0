//! The harness the end-to-end tests, the demo and the benchmark share: test
//! cgroups, a running agent, processes started inside a monitored cgroup,
//! and small servers on loopback standing in for "external" services.
//!
//! Rules it enforces: kernel programs attach only to cgroups created here
//! (below `<cgroup2>/guard-test/`), and servers bind only to 127.0.0.0/8 or
//! ::1. Without root it fails loudly; it never skips.

pub mod dns_server;
pub mod servers;
pub mod tls_server;

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use serde_json::Value;

/// Panics unless running as root: the tests load BPF and create cgroups.
pub fn require_root() {
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load eBPF programs and create cgroups: run them as root (sudo -E cargo xtask test)"
    );
}

/// Where cgroup v2 is mounted.
pub fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    for line in info.lines() {
        if let Some((left, right)) = line.split_once(" - ") {
            if right.starts_with("cgroup2 ") {
                return PathBuf::from(left.split_whitespace().nth(4).unwrap());
            }
        }
    }
    panic!("no cgroup v2 hierarchy mounted");
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A cgroup below `<cgroup2>/guard-test/`, removed (its processes killed)
/// on drop.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = cgroup2_mount()
            .join("guard-test")
            .join(format!("{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create test cgroup");
        Self { path }
    }

    /// A child cgroup (also removed with the parent).
    pub fn child(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).expect("create child cgroup");
        p
    }

    /// A command that starts inside this cgroup.
    pub fn command(&self, program: &str) -> Command {
        command_in(&self.path, program)
    }
}

/// A command whose process moves itself into `cgroup` before exec.
pub fn command_in(cgroup: &Path, program: &str) -> Command {
    let procs = cgroup.join("cgroup.procs");
    let mut cmd = Command::new(program);
    // SAFETY: only async-signal-safe work between fork and exec (open,
    // write, close via std::fs, which allocates the path beforehand).
    let procs_c = std::ffi::CString::new(procs.to_str().unwrap()).unwrap();
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs_c.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let r = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if r != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn kill_and_remove(path: &Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                kill_and_remove(&e.path());
            }
        }
    }
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    for _ in 0..100 {
        if std::fs::remove_dir(path).is_ok() || !path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        kill_and_remove(&self.path);
    }
}

/// A port free on both 127.0.0.1 and ::1.
pub fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if TcpListener::bind(("::1", port)).is_ok() {
            return port;
        }
    }
}

/// The guard-agent binary: `GUARD_AGENT_BIN`, or next to the test binary.
pub fn agent_bin() -> PathBuf {
    if let Ok(p) = std::env::var("GUARD_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap();
    if dir.ends_with("deps") {
        dir = dir.parent().unwrap();
    }
    let bin = dir.join("guard-agent");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build -p guard-agent; `cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// Where test agents forward DNS unless a test picks a resolver: the
/// discard port on loopback, where nothing listens.
pub const TEST_DNS_UPSTREAM: &str = "127.0.0.1:9";

/// Sends one UDP datagram to each target (`HOST:PORT`, IPv6 as
/// `[::1]:PORT`) with sendto and with connect+send; prints `TARGET sendto=ok|EPERM connect=ok|EPERM`.
pub const PY_UDP_PROBE: &str = r#"
import socket, sys
for t in sys.argv[1:]:
    host, port = t.rsplit(':', 1)
    host = host.strip('[]')
    fam = socket.AF_INET6 if ':' in host else socket.AF_INET
    res = []
    s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        s.sendto(b'probe', (host, int(port))); res.append('sendto=ok')
    except PermissionError:
        res.append('sendto=EPERM')
    c = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        c.connect((host, int(port))); c.send(b'probe'); res.append('connect=ok')
    except PermissionError:
        res.append('connect=EPERM')
    print(t, ' '.join(res))
"#;

/// How to start an agent.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    /// Monitored cgroups.
    pub cgroups: Vec<PathBuf>,
    /// Parent of exec cgroups (defaults to a child of the first cgroup's parent).
    pub exec_cgroup: Option<PathBuf>,
    pub intercept: Vec<String>,
    pub exclude: Vec<String>,
    pub uids: Vec<u32>,
    /// Extra environment (e.g. GUARD_LOG).
    pub env: Vec<(String, String)>,
    /// A state directory to reuse (restart tests).
    pub state_dir: Option<PathBuf>,
    /// A cgroup to start the agent process itself in.
    pub agent_cgroup: Option<PathBuf>,
    pub extra_args: Vec<String>,
    /// Start the agent with these (soft, hard) open-file limits, as
    /// systemd starts services with a soft limit of 1024.
    pub open_files: Option<(u64, u64)>,
}

/// A running agent; stopped with SIGTERM on drop.
pub struct Agent {
    pub child: Option<Child>,
    pub state_dir: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Agent {
    /// Starts an agent and waits until its admin socket answers.
    pub fn start(opts: AgentOptions) -> Agent {
        require_root();
        let (tmp, state_dir) = match &opts.state_dir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("guard-test-")
                    .tempdir()
                    .unwrap();
                let d = t.path().join("state");
                (Some(t), d)
            }
        };
        let port = free_port();
        let log = state_dir.with_extension(format!("agent-{port}.log"));
        let mut cmd = match &opts.agent_cgroup {
            Some(cg) => command_in(cg, agent_bin().to_str().unwrap()),
            None => Command::new(agent_bin()),
        };
        cmd.arg("run")
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--listen")
            .arg(format!("[::1]:{port}"));
        for c in &opts.cgroups {
            cmd.arg("--cgroup").arg(c);
        }
        if let Some(e) = &opts.exec_cgroup {
            cmd.arg("--exec-cgroup").arg(e);
        } else if let Some(first) = opts.cgroups.first() {
            cmd.arg("--exec-cgroup").arg(first.join("exec"));
        }
        for i in &opts.intercept {
            cmd.arg("--intercept").arg(i);
        }
        for e in &opts.exclude {
            cmd.arg("--exclude").arg(e);
        }
        for u in &opts.uids {
            cmd.arg("--uid").arg(u.to_string());
        }
        cmd.args(&opts.extra_args);
        let dns_chosen = opts
            .extra_args
            .iter()
            .any(|a| a == "--dns-upstream" || a == "--no-dns" || a == "--config");
        if !dns_chosen {
            // Queries from test cgroups never reach the host's resolvers
            // (tests send traffic to loopback only): forward them to a
            // loopback port nothing serves.
            cmd.args(["--dns-upstream", TEST_DNS_UPSTREAM]);
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        if let Some((soft, hard)) = opts.open_files {
            // SAFETY: setrlimit is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let logf = std::fs::File::create(&log).unwrap();
        cmd.stdout(Stdio::null()).stderr(logf);
        let child = cmd.spawn().expect("spawn guard-agent");
        let mut agent = Agent {
            child: Some(child),
            state_dir,
            port,
            log,
            _tmp: tmp,
        };
        agent.wait_ready();
        agent
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("guard-agent exited early ({st}):\n{}", self.log_text());
            }
            // Ready when *this* agent answers (a takeover start may find the
            // previous agent's socket still answering while it drains).
            let pid = self.pid();
            if self
                .try_status()
                .is_some_and(|s| s["pid"].as_u64() == Some(u64::from(pid)))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Runs `guard-agent ARGS --state-dir DIR`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(agent_bin())
            .args(args)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()
            .unwrap()
    }

    fn try_status(&self) -> Option<Value> {
        let out = self.cli(&["status", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// A command run through `guard-agent exec` (a fresh monitored cgroup
    /// below the exec cgroup, with the CA bundle environment).
    pub fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("exec")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--")
            .arg(program);
        cmd
    }

    /// The Guard CA certificate (PEM) of this agent.
    pub fn ca_pem_path(&self) -> PathBuf {
        self.state_dir.join("ca").join("guard-ca.crt")
    }

    /// A field of `/proc/<agent pid>/status` in KiB (e.g. "VmHWM", "VmRSS").
    pub fn proc_status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("agent /proc status");
        status
            .lines()
            .find_map(|l| {
                let rest = l.strip_prefix(field)?.strip_prefix(':')?;
                rest.trim().trim_end_matches("kB").trim().parse().ok()
            })
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }

    /// `guard-agent status --json`.
    pub fn status(&self) -> Value {
        self.try_status().expect("status")
    }

    /// `guard-agent events --json ARGS`, parsed.
    pub fn events(&self, args: &[&str]) -> Vec<Value> {
        events_in(&self.state_dir, args)
    }

    /// Waits until at least `n` events match `args`, and returns them.
    pub fn wait_events(&self, args: &[&str], n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ev = self.events(args);
            if ev.len() >= n {
                return ev;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} events for {args:?}, have {}: {ev:#?}\nagent log:\n{}",
                ev.len(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal and waits for the agent to exit; returns its log.
    pub fn stop_with(&mut self, sig: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        child.wait().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop_with(libc::SIGTERM);
        }
    }
}

/// `guard-agent events --json ARGS --state-dir DIR`, parsed.
pub fn events_in(state_dir: &Path, args: &[&str]) -> Vec<Value> {
    let out = Command::new(agent_bin())
        .arg("events")
        .arg("--json")
        .args(args)
        .arg("--state-dir")
        .arg(state_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "events failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Runs a command to completion, panicking with its output on failure.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Reads lines from a child's stdout until one satisfies `pred`.
pub fn read_line_until(
    child: &mut Child,
    pred: impl Fn(&str) -> bool,
    timeout: Duration,
) -> String {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if pred(&l) => return l,
            Ok(_) => {}
            Err(_) => panic!("no matching line within {timeout:?}"),
        }
    }
}

/// A socket address on the test's "external" host 127.0.0.2.
pub fn external_v4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 2], port))
}

/// A port on 127.0.0.2 where a connect is refused, reserved for as long as
/// the returned socket lives (bound, never listening: nobody else can take
/// the port meanwhile).
pub fn refusing_port() -> (socket2::Socket, u16) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&external_v4(0).into()).unwrap();
    let port = s.local_addr().unwrap().as_socket().unwrap().port();
    (s, port)
}
