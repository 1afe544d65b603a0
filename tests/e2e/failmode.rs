//! When the agent is down, end to end: pinned programs keep a killed agent's
//! scope fail-closed (refused, never direct), an opt-in fail-open window
//! lets traffic go direct once the heartbeat is stale, a handover restart
//! keeps an established stream intact and admits nothing uninspected, and
//! an excluded child of an attached cgroup goes direct.
//!
//! Every test attaches only to cgroups it created, sends traffic only to
//! 127.0.0.2, and removes the pins a killed agent leaves behind.

use std::{
    collections::HashMap,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use guard_harness::{
    command_in, external_v4, require_root,
    servers::{HashSink, HttpServer},
    Agent, AgentOptions, TestCgroup,
};

/// Removes a killed agent's pinned attachments when the test ends, however
/// it ends (pins outlive processes and cgroups).
struct PinCleanup(PathBuf);

impl Drop for PinCleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn options(cgroups: Vec<PathBuf>, state_dir: &Path, extra: &[&str]) -> AgentOptions {
    AgentOptions {
        cgroups,
        intercept: vec!["127.0.0.2/32".into()],
        state_dir: Some(state_dir.to_owned()),
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn curl_at(cgroup: &Path, url: &str) -> Output {
    command_in(cgroup, "curl")
        .args(["-sS", "--max-time", "20", url])
        .output()
        .unwrap()
}

/// A plain `connect()` from a process in `cgroup`: "ok" or the errno name.
fn connect_in(cgroup: &Path, addr: std::net::SocketAddr) -> String {
    let script = format!(
        r#"
import socket, errno
try:
    socket.create_connection(("{}", {}), timeout=20).close(); print("ok")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)))
"#,
        addr.ip(),
        addr.port()
    );
    let out = command_in(cgroup, "python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn pin_dir(agent: &Agent) -> PathBuf {
    let st = agent.status();
    PathBuf::from(st["pin_dir"].as_str().expect("status has pin_dir"))
}

fn paths_seen(server: &HttpServer) -> Vec<String> {
    server.requests().into_iter().map(|r| r.path).collect()
}

#[test]
fn a_killed_agent_in_enforce_mode_fails_closed_until_the_next_start_takes_over() {
    require_root();
    let server = HttpServer::start(external_v4(0), "ok");
    let monitored = TestCgroup::new("fail-closed");
    let outside = TestCgroup::new("fail-closed-outside");
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().join("state");
    let opts = options(vec![monitored.path.clone()], &state_dir, &[]);

    let mut agent = Agent::start(opts.clone());
    let pins = pin_dir(&agent);
    let _cleanup = PinCleanup(pins.clone());
    let st = agent.status();
    assert_eq!(st["fail_mode"], "fail-closed");
    assert!(st["heartbeat_age_ms"].as_u64().is_some(), "{st}");
    let scope = st["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["cgroup"] == monitored.path.to_str().unwrap())
        .unwrap_or_else(|| panic!("no scope entry for the monitored cgroup: {st}"));
    assert_eq!(scope["pinned"], true, "{st}");
    assert_eq!(
        scope["links"].as_u64(),
        st["programs"].as_array().map(|p| p.len() as u64),
        "one pinned link per program: {st}"
    );

    let url = |p: &str| format!("http://{}/{p}", server.addr);
    assert!(curl_at(&monitored.path, &url("before")).status.success());
    agent.wait_events(&["--kind", "connection"], 1);

    let st = agent.stop_with(libc::SIGKILL);
    assert!(!st.success());
    assert!(pins.exists(), "the pins must outlive a killed agent");

    // Monitored: refused at once (redirected to a listener that is gone).
    let out = curl_at(&monitored.path, &url("while-down"));
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl must fail to connect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(connect_in(&monitored.path, server.addr), "ECONNREFUSED");
    // Outside the scope: unaffected.
    let out = curl_at(&outside.path, &url("outside"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(paths_seen(&server), vec!["/before", "/outside"]);

    // A new start on the same state dir takes the attachments over.
    let mut agent2 = Agent::start(opts);
    assert!(
        agent2
            .log_text()
            .contains("took over from an earlier agent"),
        "{}",
        agent2.log_text()
    );
    // (A killed agent may lose the events it had not flushed yet.)
    let before = agent2.events(&["--kind", "connection"]).len();
    assert!(curl_at(&monitored.path, &url("after-restart"))
        .status
        .success());
    let events = agent2.wait_events(&["--kind", "connection"], before + 1);
    let last = events.last().unwrap();
    assert_eq!(last["dst"], server.addr.to_string());
    assert_ne!(last["verdict"], "error", "{last}");
    // Only the new generation is pinned.
    let generations: Vec<_> = std::fs::read_dir(&pins).unwrap().flatten().collect();
    assert_eq!(generations.len(), 1, "{generations:?}");

    // A clean stop detaches and removes the pins: direct again.
    let st = agent2.stop_with(libc::SIGTERM);
    assert!(st.success(), "{}", agent2.log_text());
    assert!(!pins.exists(), "SIGTERM must remove {}", pins.display());
    assert!(curl_at(&monitored.path, &url("direct")).status.success());
    assert_eq!(paths_seen(&server).last().unwrap(), "/direct");
}

/// What `systemctl stop` does (the unit's KillSignal is SIGUSR2): the agent
/// exits leaving its programs attached, monitored connects are refused, and
/// `guard-agent detach` is how an operator turns Guard off. While an agent
/// runs, `detach` refuses to touch its attachments.
#[test]
fn a_handover_stop_stays_closed_until_detach() {
    require_root();
    let server = HttpServer::start(external_v4(0), "ok");
    let monitored = TestCgroup::new("detach");
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().join("state");
    let mut agent = Agent::start(options(vec![monitored.path.clone()], &state_dir, &[]));
    let pins = pin_dir(&agent);
    let _cleanup = PinCleanup(pins.clone());
    let url = |p: &str| format!("http://{}/{p}", server.addr);
    assert!(curl_at(&monitored.path, &url("before")).status.success());

    let detach = || {
        Command::new(guard_harness::agent_bin())
            .args(["detach", "--state-dir"])
            .arg(&state_dir)
            .output()
            .unwrap()
    };
    let out = detach();
    assert!(
        !out.status.success(),
        "detach must refuse while the agent runs"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(curl_at(&monitored.path, &url("still-inspected"))
        .status
        .success());

    let st = agent.stop_with(libc::SIGUSR2);
    assert!(st.success(), "a handover stop exits cleanly: {st}");
    assert!(
        pins.exists(),
        "a handover stop leaves the programs attached"
    );
    assert_eq!(connect_in(&monitored.path, server.addr), "ECONNREFUSED");

    let out = detach();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("detached"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!pins.exists(), "detach removes the pins");
    assert!(curl_at(&monitored.path, &url("after-detach"))
        .status
        .success());
    assert_eq!(
        paths_seen(&server),
        vec!["/before", "/still-inspected", "/after-detach"]
    );
}

#[test]
fn fail_open_lets_traffic_go_direct_once_the_heartbeat_is_stale() {
    require_root();
    let server = HttpServer::start(external_v4(0), "ok");
    let cg = TestCgroup::new("fail-open");
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().join("state");
    let mut agent = Agent::start(options(
        vec![cg.path.clone()],
        &state_dir,
        &["--fail-open-after", "2s"],
    ));
    let _cleanup = PinCleanup(pin_dir(&agent));
    let st = agent.status();
    assert_eq!(st["fail_mode"], "fail-open after 2s", "{st}");
    // Alive: intercepted.
    assert!(curl_at(&cg.path, &format!("http://{}/alive", server.addr))
        .status
        .success());
    agent.wait_events(&["--kind", "connection"], 1);

    agent.stop_with(libc::SIGKILL);
    // Once the heartbeat is older than the window, connects go direct.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let out = curl_at(&cg.path, &format!("http://{}/open-{attempts}", server.addr));
        if out.status.success() {
            assert_eq!(out.stdout, b"ok");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still not direct after the window: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let seen = paths_seen(&server);
    assert_eq!(seen.last().unwrap(), &format!("/open-{attempts}"));
    // Nothing reached the server through the dead agent.
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[test]
fn excluded_child_cgroup_of_an_attached_parent_goes_direct_while_its_sibling_is_intercepted() {
    require_root();
    let server = HttpServer::start(external_v4(0), "ok");
    // The parent stands in for "the whole host".
    let host = TestCgroup::new("host");
    let excluded = host.child("excluded");
    let deeper = excluded.join("job");
    std::fs::create_dir_all(&deeper).unwrap();
    let sibling = host.child("monitored");
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().join("state");
    let agent = Agent::start(options(
        vec![host.path.clone()],
        &state_dir,
        &["--exclude-cgroup", excluded.to_str().unwrap()],
    ));
    let st = agent.status();
    assert_eq!(
        st["excluded_cgroups"][0],
        excluded.to_str().unwrap(),
        "{st}"
    );

    for (cg, path) in [(&excluded, "excluded"), (&deeper, "descendant")] {
        let out = curl_at(cg, &format!("http://{}/{path}", server.addr));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        curl_at(&sibling, &format!("http://{}/sibling", server.addr))
            .status
            .success()
    );
    let events = agent.wait_events(&["--kind", "connection"], 1);
    assert_eq!(
        events.len(),
        1,
        "only the sibling is intercepted: {events:#?}"
    );
    assert_eq!(events[0]["dst"], server.addr.to_string());
    // The excluded ones reached the server directly.
    let mut seen = paths_seen(&server);
    seen.sort();
    assert_eq!(seen, vec!["/descendant", "/excluded", "/sibling"]);
}

/// A python client in the monitored cgroup that streams to the hash sink
/// (creating `argv[3]` once connected) until `argv[2]` exists, then a little
/// more, and prints whether the sink's hash and count match what it sent.
const STREAM: &str = r#"
import socket, hashlib, os, sys, time
block = bytes((i * 7919 + 13) % 251 for i in range(1 << 16))
h = hashlib.sha256(); n = 0
s = socket.create_connection(("127.0.0.2", int(sys.argv[1])))
def send():
    global n
    s.sendall(block); h.update(block); n += len(block)
send()
open(sys.argv[3], "w").close()
while not os.path.exists(sys.argv[2]):
    send(); time.sleep(0.002)
for _ in range(64):
    send()
s.shutdown(socket.SHUT_WR)
reply = s.makefile().readline().split()
print(reply[0] == h.hexdigest(), int(reply[1]) == n, n, flush=True)
"#;

/// Short connections in a loop until `stop` exists: each sends one request
/// for /tok-N and prints `N local_port ok` or `N - error_name`.
const LOAD: &str = r#"
import socket, os, sys, errno, time
i = 0
while not os.path.exists(sys.argv[2]):
    i += 1
    time.sleep(0.01)
    try:
        s = socket.create_connection(("127.0.0.2", int(sys.argv[1])), timeout=20)
        port = s.getsockname()[1]
        s.sendall(b"GET /tok-%d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % i)
        data = b""
        while True:
            b = s.recv(4096)
            if not b: break
            data += b
        s.close()
        print(i, port, "ok" if data.startswith(b"HTTP/1.1 200") else "bad", flush=True)
    except OSError as e:
        print(i, "-", errno.errorcode.get(e.errno, str(e)), flush=True)
"#;

#[test]
fn a_handover_restart_keeps_established_streams_and_admits_nothing_uninspected() {
    require_root();
    let server = HttpServer::start(external_v4(0), "ok");
    let sink = HashSink::start(external_v4(0));
    let cg = TestCgroup::new("handover");
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().join("state");
    let work = tempfile::tempdir().unwrap();
    let stop_stream = work.path().join("stop-stream");
    let stop_load = work.path().join("stop-load");

    let mut old = Agent::start(options(vec![cg.path.clone()], &state_dir, &[]));
    let pins = pin_dir(&old);
    let _cleanup = PinCleanup(pins.clone());

    let streaming = work.path().join("streaming");
    let mut stream = cg
        .command("python3")
        .args(["-c", STREAM])
        .arg(sink.addr.port().to_string())
        .arg(&stop_stream)
        .arg(&streaming)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !streaming.exists() {
        assert!(Instant::now() < deadline, "the stream did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut load = cg
        .command("python3")
        .args(["-c", LOAD])
        .arg(server.addr.port().to_string())
        .arg(&stop_load)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The load is flowing through the old agent.
    old.wait_events(
        &["--kind", "connection", "--dest", &server.addr.to_string()],
        3,
    );

    // Restart: the new agent hands the old one over and waits for it.
    let new_opts = options(vec![cg.path.clone()], &state_dir, &["--takeover"]);
    let starter = std::thread::spawn(move || Agent::start(new_opts));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !old.log_text().contains("listeners closed") {
        assert!(
            Instant::now() < deadline,
            "no handover:\n{}",
            old.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The old agent now drains: let the stream finish, so it can exit.
    std::fs::write(&stop_stream, b"").unwrap();
    let status = old.child.take().unwrap().wait().unwrap();
    assert!(status.success(), "old agent: {status}\n{}", old.log_text());
    let new = starter.join().expect("the new agent starts");

    let mut out = String::new();
    stream
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(stream.wait().unwrap().success());
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(
        &words[..2],
        &["True", "True"],
        "the stream through the old agent must arrive intact: {out}"
    );

    // Let the load reach the server through the new agent, then stop it.
    let before = new
        .events(&["--kind", "connection", "--dest", &server.addr.to_string()])
        .len();
    new.wait_events(
        &["--kind", "connection", "--dest", &server.addr.to_string()],
        before + 3,
    );
    std::fs::write(&stop_load, b"").unwrap();
    let mut lines = String::new();
    load.stdout
        .take()
        .unwrap()
        .read_to_string(&mut lines)
        .unwrap();
    assert!(load.wait().unwrap().success());

    // Every request the server saw was made through an agent: its client's
    // local port is the `src` of a recorded connection.
    let mut port_of: HashMap<String, String> = HashMap::new();
    let mut refused = 0;
    for l in lines.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            [i, port, "ok"] => {
                port_of.insert(format!("/tok-{i}"), port.to_string());
            }
            [_, "-", _] => refused += 1,
            other => panic!("unexpected client line {other:?}"),
        }
    }
    let seen = paths_seen(&server);
    let events = new.wait_events(
        &["--kind", "connection", "--dest", &server.addr.to_string()],
        seen.len(),
    );
    let srcs: Vec<String> = events
        .iter()
        .filter_map(|e| e["src"].as_str())
        .filter_map(|s| s.rsplit(':').next().map(str::to_owned))
        .collect();
    for path in &seen {
        let port = port_of
            .get(path)
            .unwrap_or_else(|| panic!("{path} reached the server but its client saw no success"));
        assert!(
            srcs.contains(port),
            "{path} (client port {port}) reached the server with no event: uninspected"
        );
    }
    assert_eq!(
        seen.len(),
        port_of.len(),
        "every success reached the server once"
    );
    eprintln!(
        "handover: {} requests inspected, {refused} refused during the restart",
        seen.len()
    );
    drop(new);
    assert!(!pins.exists(), "the last clean stop removes the pins");
}

/// `guard-agent run` with a bad fail-open window or a missing excluded
/// cgroup says which field is wrong.
#[test]
fn bad_fail_mode_settings_name_the_problem() {
    require_root();
    let cg = TestCgroup::new("failmode-bad");
    let state = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        Command::new(guard_harness::agent_bin())
            .arg("run")
            .arg("--state-dir")
            .arg(state.path().join("state"))
            .arg("--cgroup")
            .arg(&cg.path)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&["--fail-open-after", "soon"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("fail_open_after") && err.contains("soon"),
        "{err}"
    );
    let missing = cg.path.join("no-such-cgroup");
    let out = run(&["--exclude-cgroup", missing.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("excluded cgroup") && err.contains("does not exist"),
        "{err}"
    );
}
