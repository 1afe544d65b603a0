//! Policy, detectors, masking and blocking, end to end: real kernel
//! programs, real clients (curl, python3, node) in a monitored cgroup,
//! plaintext HTTP to a server on 127.0.0.2 that records what it received,
//! policies loaded from a directory, and the real store read back.

use std::{
    io::Read,
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

#[path = "store_scan.rs"]
mod store_scan;

use guard_harness::{
    agent_bin, external_v4, require_root, run_ok,
    servers::HttpServer,
    tls_server::{TestCa, TlsServer},
    Agent, AgentOptions, TestCgroup,
};
use serde_json::Value;

const DEFAULT_POLICY: &str = include_str!("../../policies/default.ron");

/// A card number that passes Luhn.
const CARD: &str = "4111 1111 1111 1111";
const CARD_DIGITS: &str = "4111111111111111";
const SSN: &str = "536-22-8147";
const AWS_KEY: &str = "AKIAZ7QK3MXWB4PLR2TD";
const GH_TOKEN: &str = "ghp_R8fK2mQ9xW4tL7vN3bH6jP1sD5gY0cZ8aE2u";
const EMAIL: &str = "ada.lovelace@acme-corp.io";
/// Matches the custom detector that `CUSTOM_DETECTOR` adds.
const ZORK_TOKEN: &str = "zork_Q7mX2pL9vR4tK8wN3bH6jF1sD5gY0cZa";

/// A policy directory holding `files` (name, text).
fn policy_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("guard-policy-")
        .tempdir()
        .unwrap();
    for (name, text) in files {
        std::fs::write(d.path().join(name), text).unwrap();
    }
    d
}

fn agent_with(cg: &TestCgroup, dir: &Path) -> Agent {
    Agent::start(AgentOptions {
        cgroups: vec![cg.path.clone()],
        intercept: vec!["127.0.0.2/32".into()],
        extra_args: vec!["--policy-dir".into(), dir.display().to_string()],
        ..Default::default()
    })
}

/// curl ARGS... URL inside the cgroup; returns its output (not checked).
fn curl(cg: &TestCgroup, args: &[&str]) -> Output {
    cg.command("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .unwrap()
}

fn curl_ok(cg: &TestCgroup, args: &[&str]) -> String {
    let out = curl(cg, args);
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn http_events(agent: &Agent, n: usize) -> Vec<Value> {
    agent.wait_events(&["--http"], n)
}

fn find_event<'a>(events: &'a [Value], path: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["http"]["path"].as_str() == Some(path))
        .unwrap_or_else(|| panic!("no http event for {path}: {events:#?}"))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn wait_log(agent: &Agent, what: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let log = agent.log_text();
        if log.contains(what) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "agent log never said {what:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn json_card_arrives_masked_and_still_json() {
    require_root();
    let server = HttpServer::start(external_v4(0), "{}");
    let cg = TestCgroup::new("pol-json");
    let dir = policy_dir(&[("default.ron", DEFAULT_POLICY)]);
    let agent = agent_with(&cg, dir.path());

    // The rule that applies masks cards only: the email is recorded, and
    // arrives as it was sent.
    let body = format!(r#"{{"name":"Ada","card":"{CARD}","note":"thanks","contact":"{EMAIL}"}}"#);
    let url = format!("http://{}/checkout", server.addr);
    curl_ok(
        &cg,
        &[
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &body,
            &url,
        ],
    );

    let seen = server.requests();
    assert_eq!(seen.len(), 1);
    let got: Value = serde_json::from_slice(&seen[0].body).unwrap_or_else(|e| {
        panic!(
            "masked body is not JSON ({e}): {}",
            String::from_utf8_lossy(&seen[0].body)
        )
    });
    let card = got["card"].as_str().unwrap();
    assert!(!card.contains("4111"), "card not masked: {card}");
    assert!(card.ends_with("1111"), "Last4 keeps the last four: {card}");
    assert_eq!(got["name"], "Ada");
    assert_eq!(got["note"], "thanks");
    assert_eq!(
        got["contact"], EMAIL,
        "Mask(detectors: [cards...]) spares emails"
    );

    let events = http_events(&agent, 1);
    let ev = find_event(&events, "/checkout");
    assert_eq!(ev["verdict"], "mask", "{ev:#}");
    assert_eq!(ev["policy"]["rule"], "payment-data-elsewhere", "{ev:#}");
    assert_eq!(ev["policy"]["action"], "mask");
    let findings = ev["findings"].as_array().unwrap();
    let f = findings
        .iter()
        .find(|f| f["detector"] == "credit-card")
        .unwrap_or_else(|| panic!("no credit-card finding: {ev:#}"));
    assert_eq!(f["location"], "body $.card");
    assert_eq!(f["applied"], true);
    let masked = f["masked"].as_str().unwrap();
    assert!(masked.ends_with("1111") && !masked.contains("4111"), "{f}");
    let e = findings
        .iter()
        .find(|f| f["detector"] == "email")
        .unwrap_or_else(|| panic!("no email finding: {ev:#}"));
    assert_eq!(e["applied"], false, "recorded only: {e}");
    let text = ev.to_string();
    assert!(
        !text.contains(CARD) && !text.contains(CARD_DIGITS),
        "{text}"
    );
}

#[test]
fn gzip_body_with_aws_key_arrives_masked() {
    require_root();
    let server = HttpServer::start(external_v4(0), "{}");
    let cg = TestCgroup::new("pol-gzip");
    let dir = policy_dir(&[("default.ron", DEFAULT_POLICY)]);
    let agent = agent_with(&cg, dir.path());

    let url = format!("http://{}/upload", server.addr);
    let py = format!(
        r#"
import gzip, urllib.request
body = gzip.compress(b'deploy config: aws_access_key_id = {AWS_KEY}\nregion = eu-west-1\n')
req = urllib.request.Request('{url}', data=body, method='POST',
    headers={{'Content-Encoding': 'gzip', 'Content-Type': 'text/plain'}})
print(urllib.request.urlopen(req).status)
"#
    );
    run_ok(cg.command("python3").args(["-c", &py]));

    let seen = server.requests();
    assert_eq!(seen.len(), 1);
    let enc = seen[0]
        .headers
        .iter()
        .find(|(k, _)| k == "content-encoding")
        .map(|(_, v)| v.as_str());
    assert_eq!(enc, Some("gzip"), "re-compressed with the same encoding");
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&seen[0].body[..])
        .read_to_end(&mut plain)
        .expect("the server got valid gzip");
    let plain = String::from_utf8(plain).unwrap();
    assert!(!plain.contains(AWS_KEY), "not masked: {plain}");
    assert!(plain.contains("region = eu-west-1"), "{plain}");
    assert!(plain.contains("deploy config"), "{plain}");

    let events = http_events(&agent, 1);
    let ev = find_event(&events, "/upload");
    assert_eq!(ev["verdict"], "mask", "{ev:#}");
    // A secret going to a host that is not its own service: the first rule.
    assert_eq!(ev["policy"]["rule"], "secrets-leaving-home", "{ev:#}");
    assert!(ev["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["detector"] == "aws-access-key-id" && f["applied"] == true));
    assert!(!ev.to_string().contains(AWS_KEY));
}

#[test]
fn secret_in_query_string_is_masked() {
    require_root();
    let server = HttpServer::start(external_v4(0), "{}");
    let cg = TestCgroup::new("pol-query");
    let dir = policy_dir(&[("default.ron", DEFAULT_POLICY)]);
    let agent = agent_with(&cg, dir.path());

    let url = format!("http://{}/hook?token={GH_TOKEN}&page=2", server.addr);
    curl_ok(&cg, &[&url]);

    let seen = server.requests();
    assert_eq!(seen.len(), 1);
    let path = &seen[0].path;
    assert!(!path.contains(GH_TOKEN), "not masked: {path}");
    assert!(path.starts_with("/hook?token="), "{path}");
    assert!(path.ends_with("&page=2"), "{path}");

    let events = http_events(&agent, 1);
    let ev = find_event(&events, "/hook");
    assert_eq!(ev["verdict"], "mask", "{ev:#}");
    let f = &ev["findings"][0];
    assert_eq!(f["detector"], "github-token", "{ev:#}");
    assert_eq!(f["location"], "query token");
    assert!(!ev.to_string().contains(GH_TOKEN));
}

#[test]
fn secret_split_across_chunks_is_found_and_masked() {
    require_root();
    let server = HttpServer::start(external_v4(0), "{}");
    let cg = TestCgroup::new("pol-chunked");
    let dir = policy_dir(&[("default.ron", DEFAULT_POLICY)]);
    let agent = agent_with(&cg, dir.path());

    let (a, b) = GH_TOKEN.split_at(15);
    let py = format!(
        r#"
import http.client, time
def chunks():
    yield b'export GITHUB_TOKEN={a}'
    time.sleep(0.3)
    yield b'{b}\necho done\n'
c = http.client.HTTPConnection('{host}', {port}, timeout=20)
c.request('POST', '/chunked', body=chunks(), encode_chunked=True,
          headers={{'Transfer-Encoding': 'chunked', 'Content-Type': 'text/plain'}})
print(c.getresponse().status)
"#,
        host = server.addr.ip(),
        port = server.addr.port()
    );
    let out = run_ok(cg.command("python3").args(["-c", &py]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "200");

    let seen = server.requests();
    assert_eq!(seen.len(), 1);
    let body = String::from_utf8_lossy(&seen[0].body).into_owned();
    assert!(!body.contains(a) || !body.contains(b), "not masked: {body}");
    assert!(!body.contains(GH_TOKEN), "not masked: {body}");
    assert!(body.starts_with("export GITHUB_TOKEN="), "{body}");
    assert!(body.ends_with("\necho done\n"), "{body}");

    let events = http_events(&agent, 1);
    let ev = find_event(&events, "/chunked");
    assert_eq!(ev["verdict"], "mask", "{ev:#}");
    assert!(ev["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["detector"] == "github-token"));
}

const BLOCK_PASTE: &str = r#"Policy(
    name: "no-paste-sites",
    rules: [
        Rule(
            name: "no-paste-sites",
            when: (host: ["paste.*", "*.paste.*"]),
            action: Block(reason: "uploads to paste sites are not allowed"),
        ),
    ],
)"#;

#[test]
fn host_glob_block_returns_403_json_and_nothing_leaves() {
    require_root();
    let server = HttpServer::start(external_v4(0), "{}");
    let cg = TestCgroup::new("pol-block");
    let dir = policy_dir(&[
        ("10-paste.ron", BLOCK_PASTE),
        ("50-default.ron", DEFAULT_POLICY),
    ]);
    let agent = agent_with(&cg, dir.path());

    let url = format!("http://{}/new", server.addr);
    let out = curl_ok(
        &cg,
        &[
            "-H",
            "Host: paste.example",
            "-w",
            "\n%{http_code}",
            "--data-binary",
            &format!("card {CARD}"),
            &url,
        ],
    );
    let (body, code) = out.rsplit_once('\n').unwrap();
    assert_eq!(code, "403", "{out}");
    let j: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(j["rule"], "no-paste-sites", "{j:#}");
    assert_eq!(j["reason"], "uploads to paste sites are not allowed");
    assert!(j["error"].as_str().is_some_and(|e| !e.is_empty()), "{j:#}");
    assert_eq!(j["findings"], serde_json::json!(["credit-card"]), "{j:#}");
    let id = j["event_id"].as_u64().expect("event_id");
    assert!(!body.contains(CARD));

    // Another host on the same server is not blocked.
    curl_ok(&cg, &[&format!("http://{}/other", server.addr)]);
    let seen = server.requests();
    assert_eq!(seen.len(), 1, "the blocked request reached the server");
    assert_eq!(seen[0].path, "/other");

    let events = agent.wait_events(&["--verdict", "block"], 1);
    let ev = &events[0];
    assert_eq!(ev["id"].as_u64(), Some(id), "{ev:#}");
    assert_eq!(ev["host"], "paste.example");
    assert_eq!(ev["policy"]["rule"], "no-paste-sites");
    assert_eq!(ev["policy"]["action"], "block");
    assert_eq!(ev["http"]["status"], 403);
}

const BLOCK_NODE_CHILDREN: &str = r#"Policy(
    name: "node-children",
    rules: [
        Rule(
            name: "no-network-from-node-children",
            when: (ancestor: ["**/node", "**/nodejs"]),
            action: Block(reason: "processes started by node may not call out"),
        ),
    ],
)"#;

#[test]
fn block_by_ancestor_only_for_python_started_by_node() {
    require_root();
    let server = HttpServer::start(external_v4(0), "{}");
    let cg = TestCgroup::new("pol-ancestor");
    let dir = policy_dir(&[
        ("10-node.ron", BLOCK_NODE_CHILDREN),
        ("50-default.ron", DEFAULT_POLICY),
    ]);
    let agent = agent_with(&cg, dir.path());

    let py = |path: &str| {
        format!(
            r#"
import urllib.request, urllib.error
try:
    print(urllib.request.urlopen('http://{}{path}', timeout=20).status)
except urllib.error.HTTPError as e:
    print(e.code)
"#,
            server.addr
        )
    };
    let direct = run_ok(cg.command("python3").args(["-c", &py("/direct")]));
    assert_eq!(String::from_utf8_lossy(&direct.stdout).trim(), "200");

    let js = format!(
        "process.stdout.write(require('child_process').execFileSync('python3', ['-c', {}]))",
        serde_json::to_string(&py("/from-node")).unwrap()
    );
    let via_node = run_ok(cg.command("node").args(["-e", &js]));
    assert_eq!(String::from_utf8_lossy(&via_node.stdout).trim(), "403");

    let seen = server.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "/direct");

    let events = http_events(&agent, 2);
    let blocked = find_event(&events, "/from-node");
    assert_eq!(blocked["verdict"], "block", "{blocked:#}");
    assert_eq!(blocked["policy"]["rule"], "no-network-from-node-children");
    assert!(
        blocked["ancestors"].to_string().contains("node"),
        "{blocked:#}"
    );
    let direct = find_event(&events, "/direct");
    assert_eq!(direct["verdict"], "allow", "{direct:#}");
}

#[test]
fn monitor_mode_forwards_unchanged_and_records_would_have() {
    require_root();
    let server = HttpServer::start(external_v4(0), "{}");
    let cg = TestCgroup::new("pol-monitor");
    let monitor = DEFAULT_POLICY.replace("mode: Enforce", "mode: Monitor");
    assert_ne!(monitor, DEFAULT_POLICY);
    let dir = policy_dir(&[("default.ron", &monitor)]);
    let agent = agent_with(&cg, dir.path());

    let body = format!(r#"{{"card":"{CARD}"}}"#);
    let url = format!("http://{}/monitored", server.addr);
    curl_ok(
        &cg,
        &[
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &body,
            &url,
        ],
    );
    let seen = server.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].body,
        body.as_bytes(),
        "monitor mode changed the body"
    );

    let events = http_events(&agent, 1);
    let ev = find_event(&events, "/monitored");
    assert_eq!(ev["policy"]["mode"], "monitor", "{ev:#}");
    assert_eq!(ev["policy"]["would_have"], "mask", "{ev:#}");
    assert_eq!(ev["policy"]["rule"], "payment-data-elsewhere");
    assert_eq!(ev["verdict"], "allow", "{ev:#}");
    let f = &ev["findings"][0];
    assert_eq!(f["detector"], "credit-card");
    assert_eq!(f["applied"], false);
    assert!(!ev.to_string().contains(CARD), "the store got the raw card");
}

const TYPO: &str = r#"Policy(
    name: "team",
    rules: [
        Rule(
            name: "mask-cards",
            when: (findings: ["credit-crad"]),
            action: Mask(),
        ),
    ],
)
"#;

#[test]
fn policy_typo_keeps_the_last_good_policy_and_says_why() {
    require_root();
    let server = HttpServer::start(external_v4(0), "{}");
    let cg = TestCgroup::new("pol-typo");
    let dir = policy_dir(&[("10-default.ron", DEFAULT_POLICY)]);
    let agent = agent_with(&cg, dir.path());
    let typo = dir.path().join("50-team.ron");
    std::fs::write(&typo, TYPO).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    // SIGHUP or the file-change poll, whichever comes first.
    let log = wait_log(&agent, "policy not reloaded", Duration::from_secs(10));
    let line = log
        .lines()
        .find(|l| l.contains("policy not reloaded"))
        .unwrap();
    assert!(
        line.contains(&format!("{}:6", typo.display())),
        "the log names file and line: {line}"
    );
    assert!(line.contains("credit-crad"), "{line}");
    assert!(line.contains("did you mean `credit-card`"), "{line}");

    // The old policy is still in force: a card is masked.
    let url = format!("http://{}/after-typo", server.addr);
    curl_ok(
        &cg,
        &[
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &format!(r#"{{"card":"{CARD}"}}"#),
            &url,
        ],
    );
    let seen = server.requests();
    assert_eq!(seen.len(), 1);
    assert!(!contains(&seen[0].body, CARD.as_bytes()), "not masked");
    let events = http_events(&agent, 1);
    assert_eq!(find_event(&events, "/after-typo")["verdict"], "mask");

    // `policy check` says the same and fails.
    let out = Command::new(agent_bin())
        .args(["policy", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("50-team.ron:6"), "{text}");
    assert!(text.contains("did you mean `credit-card`"), "{text}");

    // A fixed file is picked up without a signal (mtime poll).
    std::fs::write(&typo, FIXED).unwrap();
    wait_log(
        &agent,
        "policy files changed: policy reloaded",
        Duration::from_secs(10),
    );
    let out = curl_ok(
        &cg,
        &[
            "-w",
            "\n%{http_code}",
            &format!("http://{}/after-fix", server.addr),
        ],
    );
    assert!(out.ends_with("\n403"), "the new rule blocks: {out}");
    assert!(out.contains("block-after-fix"), "{out}");
    assert_eq!(server.requests().len(), 1);
    let ok = Command::new(agent_bin())
        .args(["policy", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(ok.status.success());
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout).trim(),
        "ok: 7 rules in 2 files (default, Enforce)"
    );
}

const FIXED: &str = r#"Policy(
    name: "team",
    rules: [
        Rule(
            name: "block-after-fix",
            when: (path: ["/after-fix"]),
            action: Block(reason: "fixed policy"),
        ),
    ],
)
"#;

const CUSTOM_DETECTOR: &str = r#"Policy(
    name: "zork",
    detectors: (
        custom: [
            (name: "zork-token", regex: "zork_[A-Za-z0-9]{32}", class: Secret),
        ],
    ),
    rules: [],
)
"#;

#[test]
fn reload_rebuilds_the_detectors_and_a_bad_file_keeps_them() {
    require_root();
    let server = HttpServer::start(external_v4(0), "{}");
    let cg = TestCgroup::new("pol-reload");
    let dir = policy_dir(&[("10-default.ron", DEFAULT_POLICY)]);
    let agent = agent_with(&cg, dir.path());
    let send = |path: &str| {
        curl_ok(
            &cg,
            &[
                "-H",
                "Content-Type: text/plain",
                "--data-binary",
                &format!("deploy with {ZORK_TOKEN} now"),
                &format!("http://{}{path}", server.addr),
            ],
        );
    };

    // No such detector yet: the value leaves as it is.
    send("/before");
    assert!(contains(&server.requests()[0].body, ZORK_TOKEN.as_bytes()));

    // A new file with a custom detector, picked up while the agent runs.
    std::fs::write(dir.path().join("50-zork.ron"), CUSTOM_DETECTOR).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    wait_log(&agent, "policy reloaded", Duration::from_secs(10));
    send("/after-reload");
    let seen = server.requests();
    assert_eq!(seen.len(), 2);
    let body = String::from_utf8_lossy(&seen[1].body).into_owned();
    assert!(
        !body.contains(ZORK_TOKEN),
        "custom detector not applied: {body}"
    );
    assert!(
        body.starts_with("deploy with ") && body.ends_with(" now"),
        "{body}"
    );

    // A broken file: the policy and its detectors both stay.
    std::fs::write(dir.path().join("60-broken.ron"), TYPO).unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    wait_log(&agent, "policy not reloaded", Duration::from_secs(10));
    send("/after-bad-file");
    let seen = server.requests();
    assert_eq!(seen.len(), 3);
    assert!(
        !contains(&seen[2].body, ZORK_TOKEN.as_bytes()),
        "the custom detector was dropped by a failed reload"
    );

    let events = http_events(&agent, 3);
    let ev = find_event(&events, "/after-reload");
    assert_eq!(ev["verdict"], "mask", "{ev:#}");
    assert_eq!(ev["policy"]["rule"], "secrets-leaving-home", "{ev:#}");
    let f = &ev["findings"][0];
    assert_eq!(f["detector"], "zork-token", "{ev:#}");
    assert_eq!(f["applied"], true);
    assert_eq!(find_event(&events, "/after-bad-file")["verdict"], "mask");
    assert_eq!(find_event(&events, "/before")["verdict"], "allow");
}

fn base64(data: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = ((c[0] as u32) << 16)
            | ((*c.get(1).unwrap_or(&0) as u32) << 8)
            | (*c.get(2).unwrap_or(&0) as u32);
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[test]
fn the_store_never_holds_a_planted_secret() {
    require_root();
    let server = HttpServer::start(external_v4(0), "{}");
    let cg = TestCgroup::new("pol-store");
    let dir = policy_dir(&[("default.ron", DEFAULT_POLICY)]);
    let mut agent = agent_with(&cg, dir.path());

    let bearer = "eyQx7Lm2Nq9Rt4Vw8Zb3Kc6Fh1Jd5Gs0";
    let db_password = "Zq9hunterXw7Pv";
    let basic_password = "Tr0ub4dor-n3ver";
    let body = format!(
        r#"{{"card":"{CARD}","ssn":"{SSN}","aws":"{AWS_KEY}","gh":"{GH_TOKEN}","db":"postgres://admin:{db_password}@db.internal:5432/app"}}"#
    );
    let base = format!("http://{}", server.addr);
    // Everything in a JSON body, to a host that is nobody's home.
    curl_ok(
        &cg,
        &[
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &body,
            &format!("{base}/all"),
        ],
    );
    // The same as text, with a Bearer token.
    curl_ok(
        &cg,
        &[
            "-H",
            &format!("Authorization: Bearer {bearer}"),
            "--data-binary",
            &body,
            &format!("{base}/text"),
        ],
    );
    // A password in the URL (curl sends it as Basic auth) and secrets in
    // the query.
    curl_ok(
        &cg,
        &[&format!(
            "http://deploy:{basic_password}@{}/q?aws={AWS_KEY}&card={CARD_DIGITS}",
            server.addr
        )],
    );
    // A plaintext Host header claiming the token's home does not make it go
    // home (nothing verifies it): masked like anywhere else.
    curl_ok(
        &cg,
        &[
            "-H",
            "Host: api.github.com",
            "-H",
            &format!("Authorization: token {GH_TOKEN}"),
            "--data-binary",
            &format!("token={GH_TOKEN}"),
            &format!("{base}/home"),
        ],
    );
    // Secrets only their names give away: a header and a JSON field whose
    // names sound secret (the generic-secret detector), under a rule that
    // lets the request go as it is.
    let header_key = "9f8e7d6c5b4a3f2e1d0c";
    let field_key = "c0d1e2f3a4b5c6d7e8f9";
    curl_ok(
        &cg,
        &[
            "-H",
            &format!("X-Api-Key: {header_key}"),
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &format!(r#"{{"api_key":"{field_key}"}}"#),
            &format!("{base}/named"),
        ],
    );
    // A secret on the command line of the process that connects, given to
    // a secret-sounding flag as the next argument.
    let argv_key = "e8f9a0b1c2d3e4f5a6b7";
    let py = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=20).read()";
    run_ok(
        cg.command("python3")
            .args(["-c", py, &format!("{base}/argv"), "--api-key", argv_key]),
    );
    let seen = server.requests();
    assert_eq!(seen.len(), 6);
    let home = seen.iter().find(|r| r.path == "/home").unwrap();
    assert!(
        !contains(&home.body, GH_TOKEN.as_bytes()),
        "a plaintext Host header made a token go home"
    );
    agent.wait_events(&["--http"], 6);
    let status = agent.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}");

    let planted: Vec<(&str, Vec<u8>)> = vec![
        ("x-api-key header", header_key.as_bytes().to_vec()),
        ("api_key field", field_key.as_bytes().to_vec()),
        ("--api-key argument", argv_key.as_bytes().to_vec()),
        ("card", CARD.as_bytes().to_vec()),
        ("card digits", CARD_DIGITS.as_bytes().to_vec()),
        ("ssn", SSN.as_bytes().to_vec()),
        ("aws key", AWS_KEY.as_bytes().to_vec()),
        ("github token", GH_TOKEN.as_bytes().to_vec()),
        ("bearer token", bearer.as_bytes().to_vec()),
        ("db password", db_password.as_bytes().to_vec()),
        ("basic password", basic_password.as_bytes().to_vec()),
        (
            "basic credentials (base64)",
            base64(format!("deploy:{basic_password}").as_bytes()).into_bytes(),
        ),
    ];
    let store = store_scan::store_plaintext(&agent.state_dir);
    // The search reads what the store holds: the recorded paths are there.
    for path in ["/all", "/text", "/q", "/home", "/named", "/argv"] {
        assert!(
            contains(&store, path.as_bytes()),
            "{path} is not in the store's bytes"
        );
    }
    for (name, value) in &planted {
        assert!(!contains(&store, value), "the store holds the raw {name}");
    }
    // The events are there, just masked.
    let events = guard_harness::events_in(&agent.state_dir, &["--http"]);
    assert_eq!(events.len(), 6, "{events:#?}");
    let argv = find_event(&events, "/argv")["cmdline"].as_str().unwrap();
    assert!(argv.contains("--api-key tok_"), "{argv}");
    let named = find_event(&events, "/named");
    let found: Vec<&str> = named["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["detector"].as_str().unwrap())
        .collect();
    assert_eq!(found, ["generic-secret", "generic-secret"], "{named:#}");
}

/// "Goes home" trusts only a server name the upstream certificate was
/// verified for: the same token to the same server goes home with SNI
/// api.github.com and is masked when only the Host header claims it.
#[test]
fn a_token_goes_home_only_to_a_verified_server_name() {
    require_root();
    let ca = TestCa::new();
    let server = TlsServer::start_for_names(external_v4(0), &ca, &["api.github.com", "localhost"]);
    let port = server.port();
    let cg = TestCgroup::new("pol-home");
    let dir = policy_dir(&[("default.ron", DEFAULT_POLICY)]);
    let agent = Agent::start(AgentOptions {
        cgroups: vec![cg.path.clone()],
        intercept: vec!["127.0.0.2/32".into()],
        extra_args: vec![
            "--policy-dir".into(),
            dir.path().display().to_string(),
            "--upstream-root".into(),
            ca.pem_path().display().to_string(),
        ],
        ..Default::default()
    });
    let curl = |sni: &str, extra: &[&str], path: &str| {
        let out = agent
            .exec("curl")
            .args(["-sS", "--max-time", "20", "--resolve"])
            .arg(format!("{sni}:{port}:127.0.0.2"))
            .args(["-H", &format!("Authorization: token {GH_TOKEN}")])
            .args(extra)
            .arg(format!("https://{sni}:{port}{path}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "curl {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    curl("api.github.com", &[], "/home");
    curl("localhost", &["-H", "Host: api.github.com"], "/spoofed");

    let auth = |path: &str| -> String {
        server
            .header_values(path, "authorization")
            .into_iter()
            .next()
            .unwrap_or_default()
    };
    assert_eq!(
        auth("/home"),
        format!("token {GH_TOKEN}"),
        "going home, unchanged"
    );
    let spoofed = auth("/spoofed");
    assert!(
        !spoofed.contains(GH_TOKEN),
        "a Host header made the token go home: {spoofed}"
    );
    assert!(
        !spoofed.is_empty(),
        "the header was dropped instead of masked"
    );

    let events = agent.wait_events(&["--http"], 2);
    let by_path = |p: &str| {
        events
            .iter()
            .find(|e| e["http"]["path"] == p)
            .unwrap_or_else(|| panic!("no event for {p}: {events:#?}"))
    };
    let home = by_path("/home");
    assert_eq!(home["host"], "api.github.com");
    let gh_finding = |e: &Value| -> Value {
        e["findings"]
            .as_array()
            .and_then(|f| f.iter().find(|f| f["detector"] == "github-token"))
            .cloned()
            .unwrap_or_else(|| panic!("no github-token finding: {e:#}"))
    };
    assert_eq!(gh_finding(home)["goes_home"], true, "{home:#}");
    let spoofed = by_path("/spoofed");
    assert_eq!(
        spoofed["host"], "localhost",
        "policy decided on the server name"
    );
    assert_eq!(
        spoofed["http"]["host"], "api.github.com",
        "the Host sent is recorded"
    );
    assert_eq!(spoofed["verdict"], "mask", "{spoofed:#}");
    assert_eq!(gh_finding(spoofed)["goes_home"], false, "{spoofed:#}");
    assert!(!events.iter().any(|e| e.to_string().contains(GH_TOKEN)));
}

fn explain(args: &[&str]) -> (Output, String) {
    let out = Command::new(agent_bin())
        .args(["policy", "explain"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, text)
}

#[test]
fn policy_explain_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let body = tmp.path().join("body.json");
    std::fs::write(&body, format!(r#"{{"name":"Ada","card":"{CARD}"}}"#)).unwrap();
    let body_s = body.to_str().unwrap();

    let (out, text) = explain(&[
        "--method",
        "POST",
        "--url",
        "https://example.com/ingest",
        "--exe",
        "/usr/bin/python3",
        "--body",
        body_s,
        "--content-type",
        "application/json",
    ]);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("decision: Mask") && text.contains("by rule `payment-data-elsewhere`"),
        "{text}"
    );
    assert!(text.contains("MATCHED"), "{text}");
    assert!(text.contains("body $.card"), "{text}");
    assert!(
        text.contains(r#""card":"**** **** **** 1111""#),
        "the masked body: {text}"
    );
    assert!(!text.contains(CARD), "a raw card was printed: {text}");

    // The same in JSON, from a policy directory.
    let dir = policy_dir(&[("default.ron", DEFAULT_POLICY)]);
    let (out, text) = explain(&[
        "--policy-dir",
        dir.path().to_str().unwrap(),
        "--method",
        "POST",
        "--url",
        "https://example.com/ingest",
        "--body",
        body_s,
        "--content-type",
        "application/json",
        "--json",
    ]);
    assert!(out.status.success(), "{text}");
    let j: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(j["decision"]["action"], "Mask");
    assert_eq!(j["decision"]["rule"], "payment-data-elsewhere");
    assert_eq!(j["findings"][0]["detector"], "credit-card");
    let masked: Value = serde_json::from_str(j["masked_body"].as_str().unwrap()).unwrap();
    assert_eq!(masked["card"], "**** **** **** 1111");
    assert!(!text.contains(CARD));

    // A GitHub token going home is allowed.
    let (out, text) = explain(&[
        "--method",
        "POST",
        "--url",
        "https://api.github.com/user/repos",
        "--header",
        &format!("Authorization: token {GH_TOKEN}"),
        "--json",
    ]);
    assert!(out.status.success(), "{text}");
    let j: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(j["decision"]["action"], "Allow", "{j:#}");
    assert_eq!(j["decision"]["rule"], "secrets-going-home");
    assert_eq!(j["findings"][0]["detector"], "github-token");
    assert_eq!(j["findings"][0]["goes_home"], true);
    assert!(!text.contains(GH_TOKEN), "a raw token was printed: {text}");
    let trace = j["trace"].as_array().unwrap();
    assert!(trace
        .iter()
        .any(|t| t["rule"] == "secrets-going-home" && t["outcome"] == "matched"));

    // A custom detector from the policy runs and its rule decides.
    let custom = policy_dir(&[
        ("50-default.ron", DEFAULT_POLICY),
        (
            "10-acme.ron",
            r#"Policy(
    name: "acme",
    detectors: (custom: [(name: "acme-token", regex: "acme_[A-Za-z0-9]{32}", home: ["*.acme.internal"])]),
    rules: [Rule(name: "acme-tokens-stay-home", when: (leaving_home: ["acme-token"]), action: Block())],
)"#,
        ),
    ]);
    std::fs::write(&body, "key=acme_Q7fK2mQ9xW4tL7vN3bH6jP1sD5gY0cZ8").unwrap();
    for (url, action) in [
        ("https://paste.example/new", "Block"),
        ("https://ci.acme.internal/build", "Allow"),
    ] {
        let (out, text) = explain(&[
            "--policy-dir",
            custom.path().to_str().unwrap(),
            "--method",
            "POST",
            "--url",
            url,
            "--body",
            body_s,
            "--json",
        ]);
        assert!(out.status.success(), "{text}");
        let j: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(j["findings"][0]["detector"], "acme-token", "{j:#}");
        assert_eq!(j["decision"]["action"], action, "{url}: {j:#}");
        assert!(!text.contains("acme_Q7fK2mQ9"), "{text}");
    }

    // `policy check` on a good directory.
    let out = Command::new(agent_bin())
        .args(["policy", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok: 6 rules in 1 files (default, Enforce)"
    );
}
