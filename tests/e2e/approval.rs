//! Just-in-time approval and credential injection, end to end: real kernel
//! programs, curl and python3 in a monitored cgroup, plaintext HTTP to
//! servers of the test's own on 127.0.0.2 and 127.0.0.3, decisions made
//! with the real CLI over the admin socket (as root, and as unprivileged
//! users who must be refused), and the real store read back.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

#[path = "store_scan.rs"]
mod store_scan;

use guard_harness::{
    agent_bin, external_v4, read_line_until, require_root,
    servers::HttpServer,
    tls_server::{CertKind, TestCa, TlsServer},
    Agent, AgentOptions, TestCgroup,
};
use serde_json::Value;

const HOLD_POLICY: &str = r#"Policy(
    name: "approval-test",
    mode: Enforce,
    default: Allow,
    rules: [
        Rule(name: "hold-uploads", when: (path: ["/upload/**"]),
             action: RequireApproval(timeout: "60s", reason: "uploads need a person")),
        Rule(name: "hold-quick", when: (path: ["/quick/**"]),
             action: RequireApproval(timeout: "2s", reason: "short hold")),
    ],
)"#;

/// The secret only the secrets file holds (and the test server demands).
const API_KEY: &str = "gk_live_Zq8w3PL0xv7TqB2mN5cR";
const TOKEN: &str = "tok_9fX2kQ7aLm4Wz1Rb";
/// A well-formed AWS access key id for DLP to find in a held body.
const AWS_KEY: &str = "AKIAZ7QK3MXWB4PLR2TD";

fn policy_dir(text: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("guard-policy-")
        .tempdir()
        .unwrap();
    std::fs::write(d.path().join("approval.ron"), text).unwrap();
    d
}

fn start_agent(cg: &TestCgroup, policy: &Path, extra: &[&str], opts: AgentOptions) -> Agent {
    let mut extra_args = vec!["--policy-dir".to_owned(), policy.display().to_string()];
    extra_args.extend(extra.iter().map(|s| s.to_string()));
    Agent::start(AgentOptions {
        cgroups: vec![cg.path.clone()],
        intercept: vec!["127.0.0.2/32".into(), "127.0.0.3/32".into()],
        extra_args,
        ..opts
    })
}

/// curl in the monitored cgroup, in the background.
fn spawn_curl(cg: &TestCgroup, args: &[&str]) -> Child {
    cg.command("curl")
        .args(["-sS", "--max-time", "90"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn run_curl(cg: &TestCgroup, args: &[&str]) -> Output {
    spawn_curl(cg, args).wait_with_output().unwrap()
}

/// Splits curl `-w '\n%{http_code}'` output into (status, body).
fn status_and_body(out: &Output) -> (u16, String) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "no status in curl output {text:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, body.to_owned())
}

fn cli(agent: &Agent, args: &[&str]) -> Output {
    agent.cli(args)
}

fn cli_ok(agent: &Agent, args: &[&str]) -> String {
    let out = cli(agent, args);
    assert!(
        out.status.success(),
        "guard-agent {args:?} failed: {}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log_text()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Waits until a hold for `path` is pending, and returns it.
fn wait_hold(agent: &Agent, path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let holds = json_lines(&cli_ok(agent, &["approvals", "--json"]));
        if let Some(h) = holds.into_iter().find(|h| h["path"] == path) {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "no hold for {path} appeared; agent log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pending_ids(agent: &Agent) -> Vec<u64> {
    json_lines(&cli_ok(agent, &["approvals", "--json"]))
        .iter()
        .map(|h| h["id"].as_u64().unwrap())
        .collect()
}

fn event_for<'a>(events: &'a [Value], path: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["http"]["path"].as_str() == Some(path))
        .unwrap_or_else(|| panic!("no http event for {path}: {events:#?}"))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn held_requests_wait_for_approve_deny_timeout_and_grants() {
    require_root();
    let server = HttpServer::start(external_v4(0), r#"{"ok":true}"#);
    let cg = TestCgroup::new("appr-hold");
    let dir = policy_dir(HOLD_POLICY);
    let agent = start_agent(&cg, dir.path(), &[], AgentOptions::default());
    let base = format!("http://{}", server.addr);

    // `approvals --follow` streams holds as they come.
    let mut follow = Command::new(agent_bin())
        .args(["approvals", "--follow", "--json", "--state-dir"])
        .arg(&agent.state_dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();

    // 1. Held, then approved: nothing leaves until `approve`.
    let curl = spawn_curl(
        &cg,
        &[
            "-w",
            "\n%{http_code}",
            "--data-binary",
            "report=q3",
            &format!("{base}/upload/a"),
        ],
    );
    let hold = wait_hold(&agent, "/upload/a");
    assert_eq!(hold["method"], "POST", "{hold:#}");
    assert_eq!(hold["rule"], "hold-uploads");
    assert_eq!(hold["reason"], "uploads need a person");
    assert!(hold["exe"].as_str().unwrap().ends_with("curl"), "{hold:#}");
    assert_eq!(hold["uid"], 0);
    assert_eq!(hold["host"], "127.0.0.2");
    assert!(
        hold["body_preview"].as_str().unwrap().contains("report=q3"),
        "{hold:#}"
    );
    assert!(
        !hold["ancestors"].as_array().unwrap().is_empty(),
        "{hold:#}"
    );
    assert!(
        server.requests().is_empty(),
        "a held request left before approval"
    );
    let line = read_line_until(
        &mut follow,
        |l| l.contains("/upload/a"),
        Duration::from_secs(20),
    );
    let streamed: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(streamed["id"], hold["id"]);
    let _ = follow.kill();
    let _ = follow.wait();
    let table = cli_ok(&agent, &["approvals"]);
    assert!(
        table.contains("/upload/a") && table.contains("guard-agent approve"),
        "{table}"
    );
    let id = hold["id"].as_u64().unwrap();
    let said = cli_ok(
        &agent,
        &["approve", &id.to_string(), "--note", "expected report"],
    );
    assert!(said.contains("approved"), "{said}");
    let (status, body) = status_and_body(&curl.wait_with_output().unwrap());
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.requests().len(), 1);
    assert_eq!(server.requests()[0].body, b"report=q3");

    // 2. Held, then denied: 403 JSON naming the decision and the event.
    let curl = spawn_curl(
        &cg,
        &[
            "-w",
            "\n%{http_code}",
            "--data-binary",
            "x=1",
            &format!("{base}/upload/b"),
        ],
    );
    let id_b = wait_hold(&agent, "/upload/b")["id"].as_u64().unwrap();
    cli_ok(&agent, &["deny", &id_b.to_string(), "--note", "not today"]);
    let (status, body) = status_and_body(&curl.wait_with_output().unwrap());
    assert_eq!(status, 403, "{body}");
    let j: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["error"], "denied by an approver", "{j:#}");
    assert_eq!(j["event_id"].as_u64(), Some(id_b), "{j:#}");
    assert_eq!(j["note"], "not today");
    assert_eq!(j["denied_by"], "root");
    assert_eq!(server.requests().len(), 1, "a denied request left");

    // 3. Nobody decides: the short timeout denies.
    let out = run_curl(&cg, &["-w", "\n%{http_code}", &format!("{base}/quick/c")]);
    let (status, body) = status_and_body(&out);
    assert_eq!(status, 403, "{body}");
    let j: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["error"], "approval timed out", "{j:#}");
    assert!(j["event_id"].as_u64().unwrap() > 0);
    assert_eq!(server.requests().len(), 1, "a timed-out request left");
    assert!(
        pending_ids(&agent).is_empty(),
        "the timed-out hold is still listed"
    );

    // 4. A 15-minute host grant lets the next request through at once...
    let curl = spawn_curl(&cg, &["-w", "\n%{http_code}", &format!("{base}/upload/d")]);
    let id_d = wait_hold(&agent, "/upload/d")["id"].as_u64().unwrap();
    let said = cli_ok(
        &agent,
        &[
            "approve",
            &id_d.to_string(),
            "--for",
            "15m",
            "--scope",
            "host",
            "--note",
            "sprint demo",
        ],
    );
    assert!(said.contains("grant"), "{said}");
    assert_eq!(status_and_body(&curl.wait_with_output().unwrap()).0, 200);
    let out = run_curl(&cg, &["-w", "\n%{http_code}", &format!("{base}/upload/e")]);
    assert_eq!(
        status_and_body(&out).0,
        200,
        "the grant did not let /upload/e through"
    );
    assert_eq!(server.requests().len(), 3);
    let grants = json_lines(&cli_ok(&agent, &["approvals", "grants", "--json"]));
    assert_eq!(grants.len(), 1, "{grants:#?}");
    assert_eq!(grants[0]["scope"], "host");
    assert_eq!(grants[0]["host"], "127.0.0.2");
    assert_eq!(grants[0]["by_uid"], 0);
    let grant_id = grants[0]["id"].as_u64().unwrap().to_string();

    // ... and `revoke` ends it: the next one is held again.
    cli_ok(&agent, &["revoke", &grant_id, "--note", "demo over"]);
    assert!(json_lines(&cli_ok(&agent, &["approvals", "grants", "--json"])).is_empty());
    let curl = spawn_curl(&cg, &["-w", "\n%{http_code}", &format!("{base}/upload/f")]);
    let id_f = wait_hold(&agent, "/upload/f")["id"].as_u64().unwrap();
    assert_eq!(
        server.requests().len(),
        3,
        "a request left after the grant was revoked"
    );
    cli_ok(&agent, &["deny", &id_f.to_string()]);
    assert_eq!(status_and_body(&curl.wait_with_output().unwrap()).0, 403);

    // Every decision is an event with who made it.
    let http = agent.wait_events(&["--http"], 6);
    let a = event_for(&http, "/upload/a");
    assert_eq!(a["verdict"], "allow", "{a:#}");
    assert_eq!(a["admin"]["action"], "approve", "{a:#}");
    assert_eq!(a["admin"]["by_uid"], 0);
    assert_eq!(a["admin"]["by_user"], "root");
    assert_eq!(a["admin"]["note"], "expected report");
    assert_eq!(event_for(&http, "/upload/b")["verdict"], "block");
    assert_eq!(event_for(&http, "/quick/c")["admin"]["action"], "timeout");
    let e = event_for(&http, "/upload/e");
    assert_eq!(e["admin"]["action"], "granted", "{e:#}");
    assert_eq!(
        e["admin"]["grant_id"].as_u64().unwrap().to_string(),
        grant_id
    );

    let approvals = agent.wait_events(&["--kind", "approval"], 5);
    let actions: Vec<&str> = approvals
        .iter()
        .map(|e| e["admin"]["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["approve", "deny", "timeout", "approve", "deny"],
        "{approvals:#?}"
    );
    let deny = &approvals[1];
    assert_eq!(deny["admin"]["hold_id"].as_u64(), Some(id_b));
    assert_eq!(deny["admin"]["by_user"], "root");
    assert_eq!(deny["admin"]["note"], "not today");
    assert!(deny["ts"].as_str().is_some());
    let grants = agent.wait_events(&["--kind", "grant"], 2);
    let actions: Vec<&str> = grants
        .iter()
        .map(|e| e["admin"]["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["grant", "revoke"], "{grants:#?}");
    assert_eq!(grants[1]["admin"]["note"], "demo over");
    let table = cli_ok(&agent, &["events", "--kind", "grant"]);
    assert!(table.contains("grant revoke"), "{table}");

    // A policy reload is an event too.
    std::fs::write(
        dir.path().join("approval.ron"),
        HOLD_POLICY.replace("uploads need a person", "uploads need a human"),
    )
    .unwrap();
    // SAFETY: signalling the agent this test started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    let reloads = agent.wait_events(&["--kind", "policy_reload"], 1);
    assert_eq!(
        reloads[0]["admin"]["action"], "policy_reload",
        "{reloads:#?}"
    );
}

/// A user (created if missing) with `groups` as supplementary groups.
fn ensure_user(name: &str, groups: &[&str]) {
    for g in groups {
        let _ = Command::new("groupadd").arg("-f").arg(g).status();
    }
    if Command::new("id")
        .arg(name)
        .output()
        .unwrap()
        .status
        .success()
    {
        let _ = Command::new("usermod")
            .args(["-a", "-G", &groups.join(",")])
            .arg(name)
            .status();
        return;
    }
    let mut cmd = Command::new("useradd");
    cmd.args(["-M", "-r", "-s", "/usr/sbin/nologin"]);
    if !groups.is_empty() {
        cmd.args(["-G", &groups.join(",")]);
    }
    let st = cmd.arg(name).status().unwrap();
    assert!(st.success(), "useradd {name} failed");
}

/// `guard-agent ARGS` run as `user` (with its primary and supplementary
/// groups) inside `cgroup` (monitored).
fn cli_as(user: &str, cg: &TestCgroup, agent: &Agent, args: &[&str]) -> Output {
    let gid = Command::new("id").args(["-g", user]).output().unwrap();
    let gid = String::from_utf8(gid.stdout).unwrap().trim().to_owned();
    assert!(!gid.is_empty(), "no user {user}");
    cg.command("setpriv")
        .args(["--reuid", user, "--regid", &gid, "--init-groups", "--"])
        .arg(agent_bin())
        .args(args)
        .arg("--state-dir")
        .arg(&agent.state_dir)
        .output()
        .unwrap()
}

#[test]
fn an_unprivileged_user_cannot_decide_holds_or_read_events() {
    require_root();
    const ADMINS: &str = "guardtest-ops";
    const APPROVERS: &str = "guardtest-appr";
    const DEV: &str = "guardtest-dev";
    ensure_user(DEV, &[ADMINS]);
    let _ = Command::new("groupadd").args(["-f", APPROVERS]).status();

    let server = HttpServer::start(external_v4(0), r#"{"ok":true}"#);
    let cg = TestCgroup::new("appr-perm");
    let dir = policy_dir(HOLD_POLICY);
    // A state directory other users can reach (the agent makes it 0750
    // root:admin-group itself).
    let parent = tempfile::Builder::new()
        .prefix("guard-perm-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let agent = start_agent(
        &cg,
        dir.path(),
        &["--admin-group", ADMINS, "--approver-group", APPROVERS],
        AgentOptions {
            state_dir: Some(parent.path().join("state")),
            ..Default::default()
        },
    );

    let curl = spawn_curl(
        &cg,
        &[
            "-w",
            "\n%{http_code}",
            &format!("http://{}/upload/mine", server.addr),
        ],
    );
    let id = wait_hold(&agent, "/upload/mine")["id"]
        .as_u64()
        .unwrap()
        .to_string();

    // The developer (admin group, not an approver), inside the monitored
    // cgroup: `status` works (so the binary and the socket are reachable)...
    let out = cli_as(DEV, &cg, &agent, &["status", "--json"]);
    assert!(
        out.status.success(),
        "status as {DEV} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... but approving, listing and reading events are refused.
    for args in [
        vec!["approve", id.as_str()],
        vec!["approve", id.as_str(), "--for", "15m"],
        vec!["deny", id.as_str()],
        vec!["approvals"],
        vec!["approvals", "grants"],
        vec!["events", "--json"],
    ] {
        let out = cli_as(DEV, &cg, &agent, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{args:?} as {DEV} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(err.contains("permission denied"), "{args:?}: {err}");
        assert!(err.contains(APPROVERS), "{args:?}: {err}");
        assert!(
            out.stdout.is_empty(),
            "{args:?} printed something: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // `nobody`, in no group at all, cannot even reach the socket.
    for args in [vec!["approve", id.as_str()], vec!["events", "--json"]] {
        let out = cli_as("nobody", &cg, &agent, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} as nobody succeeded");
        assert!(
            err.to_lowercase().contains("permission denied"),
            "{args:?}: {err}"
        );
    }

    // Nothing changed: the hold still waits, nothing left, no decision recorded.
    assert_eq!(pending_ids(&agent), vec![id.parse::<u64>().unwrap()]);
    assert!(server.requests().is_empty());
    assert!(agent.events(&["--kind", "approval"]).is_empty());
    cli_ok(&agent, &["approve", &id]);
    let (status, _) = status_and_body(&curl.wait_with_output().unwrap());
    assert_eq!(status, 200);
    let log = agent.log_text();
    assert!(log.contains("not root or in the approver group"), "{log}");
}

#[test]
fn a_new_hold_fires_the_hook_and_the_webhook_which_is_not_intercepted() {
    require_root();
    let server = HttpServer::start(external_v4(0), r#"{"ok":true}"#);
    // The webhook receiver lies inside the intercepted range.
    let hook_server = HttpServer::start("127.0.0.3:0".parse().unwrap(), r#"{"ok":true}"#);
    let cg = TestCgroup::new("appr-notify");
    let dir = policy_dir(HOLD_POLICY);
    let tmp = tempfile::tempdir().unwrap();
    let out_file = tmp.path().join("hook-stdin.json");
    let env_file = tmp.path().join("hook-env.txt");
    let script = tmp.path().join("hook.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncat > {out}.tmp && mv {out}.tmp {out}\nenv | grep '^GUARD_' > {env}.tmp && mv {env}.tmp {env}\n",
            out = out_file.display(),
            env = env_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
    let webhook = format!("http://{}/hooks/guard", hook_server.addr);
    // The agent runs inside the monitored cgroup: only its own exclusion
    // keeps the webhook from being redirected into itself.
    let agent = start_agent(
        &cg,
        dir.path(),
        &[
            "--notify-command",
            script.to_str().unwrap(),
            "--notify-webhook",
            &webhook,
        ],
        AgentOptions {
            agent_cgroup: Some(cg.child("agent")),
            ..Default::default()
        },
    );

    let curl = spawn_curl(
        &cg,
        &[
            "-w",
            "\n%{http_code}",
            "--data-binary",
            &format!("note=hello&aws_key={AWS_KEY}"),
            &format!("http://{}/upload/n", server.addr),
        ],
    );
    let id = wait_hold(&agent, "/upload/n")["id"].as_u64().unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    while !(out_file.exists() && env_file.exists() && !hook_server.requests().is_empty()) {
        assert!(
            Instant::now() < deadline,
            "hook or webhook did not fire; agent log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stdin_bytes = std::fs::read(&out_file).unwrap();
    let summary: Value = serde_json::from_slice(&stdin_bytes).unwrap();
    // The summary is masked: the key found in the body is not in it.
    assert!(!contains(&stdin_bytes, AWS_KEY.as_bytes()), "{summary:#}");
    assert!(!contains(
        &hook_server.requests()[0].body,
        AWS_KEY.as_bytes()
    ));
    assert!(!contains(
        &std::fs::read(&env_file).unwrap(),
        AWS_KEY.as_bytes()
    ));
    let found: Vec<&str> = summary["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["detector"].as_str().unwrap())
        .collect();
    assert!(found.contains(&"aws-access-key-id"), "{summary:#}");
    assert!(
        summary["body_preview"]
            .as_str()
            .unwrap()
            .contains("note=hello"),
        "{summary:#}"
    );
    assert_eq!(summary["id"].as_u64(), Some(id), "{summary:#}");
    assert_eq!(summary["path"], "/upload/n");
    assert_eq!(summary["rule"], "hold-uploads");
    assert!(
        summary["exe"]
            .as_str()
            .unwrap_or_default()
            .ends_with("curl"),
        "{summary:#}"
    );
    let env = std::fs::read_to_string(&env_file).unwrap();
    assert!(env.contains(&format!("GUARD_HOLD_ID={id}")), "{env}");
    assert!(
        env.contains(&format!("GUARD_APPROVE_COMMAND=guard-agent approve {id}")),
        "{env}"
    );

    let hooks = hook_server.requests();
    assert_eq!(hooks[0].method, "POST");
    assert_eq!(hooks[0].path, "/hooks/guard");
    let j: Value = serde_json::from_slice(&hooks[0].body).unwrap();
    let text = j["text"].as_str().unwrap();
    assert!(text.contains("/upload/n"), "{text}");
    assert!(
        text.contains(&format!("guard-agent approve {id}")),
        "{text}"
    );
    assert!(text.contains(&format!("guard-agent deny {id}")), "{text}");

    cli_ok(&agent, &["deny", &id.to_string()]);
    assert_eq!(status_and_body(&curl.wait_with_output().unwrap()).0, 403);
    // The webhook was not intercepted: no event names its address.
    let all = agent.wait_events(&["--http"], 1);
    assert!(
        all.iter()
            .all(|e| !e["dst"].as_str().unwrap_or("").starts_with("127.0.0.3")),
        "the agent's own webhook call was intercepted: {all:#?}"
    );
    assert!(agent.events(&["--dest", "127.0.0.3"]).is_empty());
}

/// Writes a secrets file (root, 0600) and returns its path.
fn secrets_file(dir: &Path, mode: u32) -> PathBuf {
    let p = dir.join("secrets.ron");
    std::fs::write(
        &p,
        format!(
            r#"(
    secrets: [
        (name: "demo-api", value: "{API_KEY}"),
        (name: "demo-token", value: "{TOKEN}"),
    ],
    bindings: [
        (secret: "demo-api", hosts: ["127.0.0.2"], path: "/api/**",
         header: ("X-Api-Key", "{{secret}}")),
        (secret: "demo-token", hosts: ["127.0.0.2"], path: "/tok/**"),
    ],
)"#
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

#[test]
fn injected_credentials_reach_only_their_host_and_never_the_store() {
    require_root();
    // The service demands the key that only the secrets file holds.
    let server = HttpServer::start_with(external_v4(0), |req| {
        let keys: Vec<&str> = req
            .headers
            .iter()
            .filter(|(k, _)| k == "x-api-key")
            .map(|(_, v)| v.as_str())
            .collect();
        if req.path.starts_with("/api/") && keys != [API_KEY] {
            return (401, r#"{"error":"bad key"}"#.into());
        }
        (200, r#"{"ok":true}"#.into())
    });
    let elsewhere = HttpServer::start("127.0.0.3:0".parse().unwrap(), r#"{"ok":true}"#);
    let cg = TestCgroup::new("appr-secrets");
    let dir = policy_dir(HOLD_POLICY);
    let tmp = tempfile::tempdir().unwrap();

    // A group-readable secrets file is refused with a clear error.
    let loose = secrets_file(tmp.path(), 0o644);
    let out = Command::new(agent_bin())
        .args(["run", "--cgroup"])
        .arg(&cg.path)
        .arg("--state-dir")
        .arg(tmp.path().join("loose-state"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", guard_harness::free_port()))
        .arg("--secrets-file")
        .arg(&loose)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the agent accepted a 0644 secrets file"
    );
    assert!(err.contains("0644") && err.contains("0600"), "{err}");
    assert!(!err.contains(API_KEY), "{err}");

    let file = secrets_file(tmp.path(), 0o600);
    let agent = start_agent(
        &cg,
        dir.path(),
        &["--secrets-file", file.to_str().unwrap()],
        AgentOptions {
            env: vec![("GUARD_LOG".into(), "debug".into())],
            ..Default::default()
        },
    );
    let base = format!("http://{}", server.addr);
    let mut responses: Vec<u8> = Vec::new();

    // curl sends its own (fake) key: dropped, the real one set.
    let out = run_curl(
        &cg,
        &[
            "-w",
            "\n%{http_code}",
            "-H",
            "X-Api-Key: client-fake",
            &format!("{base}/api/orders"),
        ],
    );
    responses.extend(&out.stdout);
    assert_eq!(
        status_and_body(&out).0,
        200,
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // python3 sends none at all.
    let py = cg
        .command("python3")
        .arg("-c")
        .arg(format!(
            "import urllib.request\nr = urllib.request.urlopen('{base}/api/py', timeout=20)\nprint(r.status, r.read().decode())"
        ))
        .output()
        .unwrap();
    responses.extend(&py.stdout);
    responses.extend(&py.stderr);
    assert!(
        py.status.success(),
        "python3: {}",
        String::from_utf8_lossy(&py.stderr)
    );
    assert!(String::from_utf8_lossy(&py.stdout).starts_with("200"));

    // A placeholder in a header and in the URL, to the bound host and path.
    let out = run_curl(
        &cg,
        &[
            "-w",
            "\n%{http_code}",
            "-H",
            "Authorization: Bearer guard:secret/demo-token",
            &format!("{base}/tok/x?key=guard:secret/demo-token"),
        ],
    );
    responses.extend(&out.stdout);
    assert_eq!(status_and_body(&out).0, 200);

    // The same placeholder to another host, and to an unbound path: blocked.
    let out = run_curl(
        &cg,
        &[
            "-w",
            "\n%{http_code}",
            "-H",
            "Authorization: Bearer guard:secret/demo-token",
            &format!("http://{}/steal", elsewhere.addr),
        ],
    );
    responses.extend(&out.stdout);
    let (status, body) = status_and_body(&out);
    assert_eq!(status, 403, "{body}");
    let j: Value = serde_json::from_str(&body).unwrap();
    assert!(
        j["reason"].as_str().unwrap().contains("demo-token"),
        "{j:#}"
    );
    assert!(j["event_id"].as_u64().is_some());
    assert!(
        elsewhere.requests().is_empty(),
        "a placeholder reached another host"
    );
    let out = run_curl(
        &cg,
        &[
            "-w",
            "\n%{http_code}",
            &format!("{base}/other?k=guard:secret/demo-token"),
        ],
    );
    responses.extend(&out.stdout);
    assert_eq!(status_and_body(&out).0, 403);

    // A Host header naming the bound host while connecting elsewhere gets
    // neither the bound header nor its placeholder filled in.
    let spoof = format!("http://{}/api/spoof", elsewhere.addr);
    let out = run_curl(
        &cg,
        &["-w", "\n%{http_code}", "-H", "Host: 127.0.0.2", &spoof],
    );
    responses.extend(&out.stdout);
    assert_eq!(status_and_body(&out).0, 200);
    let out = run_curl(
        &cg,
        &[
            "-w",
            "\n%{http_code}",
            "-H",
            "Host: 127.0.0.2",
            "-H",
            "X-Api-Key: guard:secret/demo-api",
            &spoof,
        ],
    );
    responses.extend(&out.stdout);
    assert_eq!(status_and_body(&out).0, 403);
    let got = elsewhere.requests();
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(
        got[0].headers.iter().all(|(k, _)| k != "x-api-key"),
        "{got:#?}"
    );

    let seen = server.requests();
    assert_eq!(seen.len(), 3, "{seen:#?}");
    let get = |i: usize, h: &str| -> Vec<String> {
        seen[i]
            .headers
            .iter()
            .filter(|(k, _)| k == h)
            .map(|(_, v)| v.clone())
            .collect()
    };
    assert_eq!(
        get(0, "x-api-key"),
        [API_KEY],
        "the client's own value must be dropped"
    );
    assert_eq!(get(1, "x-api-key"), [API_KEY]);
    assert_eq!(get(2, "authorization"), [format!("Bearer {TOKEN}")]);
    assert_eq!(seen[2].path, format!("/tok/x?key={TOKEN}"));

    // The store saw the placeholder, not the secret.
    let events = agent.wait_events(&["--http"], 7);
    let tok = event_for(&events, "/tok/x");
    assert!(
        tok.to_string().contains("guard:secret/demo-token"),
        "{tok:#}"
    );
    let steal = event_for(&events, "/steal");
    assert_eq!(steal["verdict"], "block");
    let events_text = cli_ok(&agent, &["events", "--json"]);
    let explain = Command::new(agent_bin())
        .args(["policy", "explain", "--method", "GET", "--url"])
        .arg(format!("{base}/api/orders"))
        .arg("--policy-dir")
        .arg(dir.path())
        .output()
        .unwrap();

    let mut agent = agent;
    assert!(agent.stop_with(libc::SIGTERM).success()); // flushes the store
    let state = agent.state_dir.clone();
    let log = std::fs::read(&agent.log).unwrap();
    let store = store_scan::store_plaintext(&state);
    assert!(
        contains(&store, b"/api/orders"),
        "the recorded path is not in the store's bytes"
    );
    for secret in [API_KEY, TOKEN] {
        let s = secret.as_bytes();
        assert!(!contains(&store, s), "{secret} is in the store's bytes");
        assert!(!contains(&log, s), "{secret} is in the agent log");
        assert!(!contains(&responses, s), "{secret} reached a client");
        assert!(
            !contains(events_text.as_bytes(), s),
            "{secret} is in `events`"
        );
        assert!(!contains(&explain.stdout, s) && !contains(&explain.stderr, s));
    }
}

/// Key rotation without a restart: SIGHUP rereads the secrets file; a file
/// that fails its checks keeps the key in force; both are recorded, and
/// neither key reaches the store.
#[test]
fn sighup_rotates_injected_secrets_and_a_loose_file_keeps_the_old_ones() {
    require_root();
    const ROTATED: &str = "gk_live_R0tat3dK3yVv9Lq2Xc8";
    let server = HttpServer::start(external_v4(0), r#"{"ok":true}"#);
    let cg = TestCgroup::new("appr-rotate");
    let dir = policy_dir(HOLD_POLICY);
    let tmp = tempfile::tempdir().unwrap();
    let file = secrets_file(tmp.path(), 0o600);
    let mut agent = start_agent(
        &cg,
        dir.path(),
        &["--secrets-file", file.to_str().unwrap()],
        AgentOptions::default(),
    );
    let key_seen = |path: &str| -> String {
        let out = run_curl(&cg, &[&format!("http://{}{path}", server.addr)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let seen = server.requests();
        let r = seen
            .iter()
            .rev()
            .find(|r| r.path == path)
            .expect("request seen");
        r.headers
            .iter()
            .find(|(k, _)| k == "x-api-key")
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(key_seen("/api/before"), API_KEY);

    // Rotate: same file, new value, SIGHUP.
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace(API_KEY, ROTATED);
    std::fs::write(&file, &text).unwrap();
    let pid = agent.pid() as i32;
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    loop {
        n += 1;
        if key_seen(&format!("/api/rotated-{n}")) == ROTATED {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated key was never injected"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A loosened file is refused on reload; the rotated key stays.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let failed = loop {
        let evs = agent.events(&["--kind", "policy_reload"]);
        if let Some(e) = evs
            .iter()
            .find(|e| e["admin"]["action"] == "secrets_reload_failed")
        {
            break e.clone();
        }
        assert!(Instant::now() < deadline, "no failed secrets reload event");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        failed["error"]
            .as_str()
            .unwrap_or_default()
            .contains("0644"),
        "{failed:#}"
    );
    assert_eq!(key_seen("/api/after-loose"), ROTATED);
    let evs = agent.events(&["--kind", "policy_reload"]);
    assert!(evs.iter().any(|e| e["admin"]["action"] == "secrets_reload"));

    let status = agent.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}");
    let mut bytes = store_scan::all_bytes_under(&agent.state_dir);
    bytes.extend(store_scan::store_plaintext(&agent.state_dir));
    for key in [API_KEY, ROTATED] {
        assert!(
            !contains(&bytes, key.as_bytes()),
            "a key reached the state dir"
        );
        assert!(!contains(agent.log_text().as_bytes(), key.as_bytes()));
    }
}

#[test]
fn https_credentials_follow_the_verified_server_name_not_the_host_header() {
    require_root();
    let ca = TestCa::new();
    let server = TlsServer::start(external_v4(0), &ca, CertKind::Valid);
    let port = server.port();
    let cg = TestCgroup::new("appr-tls");
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("secrets.ron");
    std::fs::write(
        &file,
        format!(
            r#"(secrets: [(name: "tls-api", value: "{API_KEY}")],
                bindings: [(secret: "tls-api", hosts: ["api.test"], header: ("Authorization", "Bearer {{secret}}"))])"#
        ),
    )
    .unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let agent = Agent::start(AgentOptions {
        cgroups: vec![cg.path.clone()],
        intercept: vec!["127.0.0.2/32".into()],
        extra_args: vec![
            "--upstream-root".into(),
            ca.pem_path().display().to_string(),
            "--secrets-file".into(),
            file.display().to_string(),
        ],
        ..Default::default()
    });
    let curl = |sni: &str, extra: &[&str], path: &str| -> Output {
        let out = agent
            .exec("curl")
            .args(["-sS", "--max-time", "20", "--http2", "--resolve"])
            .arg(format!("{sni}:{port}:127.0.0.2"))
            .args(extra)
            .arg(format!("https://{sni}:{port}{path}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!contains(&out.stdout, API_KEY.as_bytes()));
        out
    };
    curl("api.test", &["-H", "Authorization: Bearer mine"], "/real");
    // SNI `localhost` (the certificate covers it) with a Host of `api.test`.
    curl("localhost", &["-H", "Host: api.test"], "/spoofed");

    let seen = server.requests();
    let auth = |path: &str| server.header_values(path, "authorization");
    assert_eq!(auth("/real"), [format!("Bearer {API_KEY}")]);
    let spoofed = seen.iter().find(|r| r.path == "/spoofed").unwrap();
    assert!(
        spoofed
            .host
            .as_deref()
            .is_some_and(|h| h.starts_with("api.test")),
        "the spoofed Host did not reach the server: {spoofed:?}"
    );
    assert!(
        auth("/spoofed").is_empty(),
        "injected for a Host header the server name does not back"
    );
    let events = agent.wait_events(&["--http"], 2);
    assert!(!events.iter().any(|e| e.to_string().contains(API_KEY)));
}

#[test]
fn an_opaque_tcp_connection_is_held_as_a_whole() {
    require_root();
    let echo = guard_harness::servers::EchoServer::start(external_v4(0));
    let cg = TestCgroup::new("appr-tcp");
    let dir = policy_dir(
        r#"Policy(name: "tcp-hold", mode: Enforce, default: Allow, rules: [
            Rule(name: "hold-raw-tcp", when: (protocol: [Tcp]),
                 action: RequireApproval(timeout: "60s", reason: "raw TCP")),
        ])"#,
    );
    let agent = start_agent(&cg, dir.path(), &[], AgentOptions::default());
    let client = |line: &str| -> Child {
        cg.command("python3")
            .arg("-c")
            .arg(format!(
                "import socket\ns = socket.create_connection(('127.0.0.2', {}), timeout=60)\ns.sendall(b'{line}\\n')\ntry:\n    print(s.recv(100).decode().strip())\nexcept OSError as e:\n    print('error', e)\n",
                echo.addr.port()
            ))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    let first = client("hello guard");
    let hold = wait_hold(&agent, "");
    assert_eq!(hold["method"], "CONNECT", "{hold:#}");
    assert_eq!(hold["scheme"], "tcp");
    assert_eq!(hold["rule"], "hold-raw-tcp");
    assert!(hold["exe"].as_str().unwrap().contains("python"), "{hold:#}");
    cli_ok(&agent, &["approve", &hold["id"].to_string()]);
    let out = first.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello guard");

    let second = client("not you");
    let id = wait_hold(&agent, "")["id"].to_string();
    cli_ok(&agent, &["deny", &id]);
    let out = second.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        !said.contains("not you"),
        "a denied connection was spliced: {said}"
    );

    let conns = agent.wait_events(&["--kind", "connection", "--verdict", "block"], 1);
    assert_eq!(conns[0]["admin"]["action"], "deny", "{conns:#?}");
    assert_eq!(conns[0]["id"].to_string(), id);
}
