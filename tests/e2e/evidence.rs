//! Evidence for investigations, end to end: after curl posts through the
//! agent (TLS terminated, a test server of the test's own on 127.0.0.2),
//! `guard-agent events show ID` prints the exchange the way `curl -v` would
//! (credentials fingerprinted, excerpts masked) while the agent runs and,
//! from the store, after it stopped; `events export` writes HAR and NDJSON
//! with the same filters as `events`.

use std::{os::unix::fs::PermissionsExt, process::Output};

use guard_harness::{
    external_v4, require_root, run_ok,
    tls_server::{CertKind, TestCa, TlsServer},
    Agent, AgentOptions, TestCgroup,
};
use serde_json::Value;

const BEARER: &str = "Bearer sk-evidence-9f8e7d6c5b4a39281706";
const CARD: &str = "4111111111111111";

fn agent_for(cg: &TestCgroup, ca: &TestCa) -> Agent {
    Agent::start(AgentOptions {
        cgroups: vec![cg.path.clone()],
        intercept: vec!["127.0.0.2/32".into()],
        extra_args: vec![
            "--upstream-root".to_owned(),
            ca.pem_path().to_str().unwrap().to_owned(),
        ],
        ..Default::default()
    })
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(&out)
}

/// Checks what `events show` printed for the POST.
fn assert_shows_the_post(text: &str, port: u16) {
    assert!(
        text.contains("> POST /v1/upload?case=7 HTTP/1.1\n"),
        "{text}"
    );
    assert!(
        text.contains("> content-type: application/json\n"),
        "{text}"
    );
    let auth = text
        .lines()
        .find(|l| l.starts_with("> authorization: "))
        .unwrap_or_else(|| panic!("no authorization line: {text}"));
    assert!(auth.starts_with("> authorization: fp_"), "{auth}");
    assert!(!text.contains("sk-evidence"), "a raw credential: {text}");
    assert!(!text.contains(CARD), "an unmasked card: {text}");
    assert!(text.contains("< HTTP/1.1 200 OK\n"), "{text}");
    assert!(text.contains("< x-test-server: tls\n"), "{text}");
    assert!(text.contains("* process: pid "), "{text}");
    assert!(text.contains("/usr/bin/curl"), "{text}");
    assert!(text.contains("* user: root (uid 0"), "{text}");
    assert!(
        text.contains(&format!("* destination: 127.0.0.2:{port} (api.test)")),
        "{text}"
    );
    assert!(text.contains("* TLS: client TLSv1_"), "{text}");
    assert!(text.contains("* timings: first byte "), "{text}");
    assert!(text.contains("* verdict: "), "{text}");
}

#[test]
fn events_show_and_export_give_the_evidence_with_the_agent_running_and_stopped() {
    require_root();
    let ca = TestCa::new();
    let server = TlsServer::start(external_v4(0), &ca, CertKind::Valid);
    let port = server.port();
    let cg = TestCgroup::new("evidence");
    let mut agent = agent_for(&cg, &ca);
    let resolve = format!("api.test:{port}:127.0.0.2");

    let body = format!(r#"{{"note":"for the record","card":"{CARD}"}}"#);
    run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "20",
        "--http1.1",
        "--resolve",
        &resolve,
        "-H",
        &format!("Authorization: {BEARER}"),
        "-H",
        "Content-Type: application/json",
        "--data",
        &body,
        &format!("https://api.test:{port}/v1/upload?case=7"),
    ]));
    run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "20",
        "--resolve",
        &resolve,
        &format!("https://api.test:{port}/v1/other"),
    ]));
    let dst = server.addr.to_string();
    let reqs = agent.wait_events(&["--http", "--dest", &dst], 2);
    let post = reqs
        .iter()
        .find(|e| e["http"]["method"] == "POST")
        .unwrap_or_else(|| panic!("no POST: {reqs:#?}"));
    let id = post["id"].as_u64().unwrap().to_string();
    let conns = agent.wait_events(&["--kind", "connection", "--dest", &dst], 2);
    let conn = conns
        .iter()
        .find(|c| c["conn_id"] == post["conn_id"])
        .unwrap_or_else(|| panic!("no connection for the POST: {conns:#?}"));
    let conn_id = conn["id"].as_u64().unwrap().to_string();

    // While the agent runs: through the admin socket.
    let text = ok(agent.cli(&["events", "show", &id]), "events show");
    assert!(
        text.contains(&format!("* event {id} · HTTP request")),
        "{text}"
    );
    assert_shows_the_post(&text, port);
    let json: Value = serde_json::from_str(&ok(
        agent.cli(&["events", "show", &id, "--json"]),
        "events show --json",
    ))
    .expect("show --json prints JSON");
    assert_eq!(json["id"], post["id"]);
    assert_eq!(json["http"]["path"], "/v1/upload");
    let text = ok(
        agent.cli(&["events", "show", &conn_id]),
        "show a connection",
    );
    assert!(text.contains("· connection"), "{text}");
    assert!(text.contains("* requests (1):"), "{text}");
    assert!(
        text.contains(&format!("{id}  POST api.test/v1/upload?case=7 → 200")),
        "{text}"
    );

    // An unknown id: a clear error and a non-zero exit.
    let out = agent.cli(&["events", "show", "987654321"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no event with id 987654321"), "{err}");

    // HAR: the two requests, URLs as sent, credentials fingerprinted.
    let har: Value = serde_json::from_str(&ok(
        agent.cli(&["events", "export", "--format", "har", "--dest", &dst]),
        "export har",
    ))
    .expect("HAR is JSON");
    assert_eq!(har["log"]["version"], "1.2");
    assert_eq!(har["log"]["creator"]["name"], "guard-agent");
    let entries = har["log"]["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{har:#}");
    let urls: Vec<&str> = entries
        .iter()
        .map(|e| e["request"]["url"].as_str().unwrap())
        .collect();
    assert!(
        urls.contains(&format!("https://api.test:{port}/v1/upload?case=7").as_str()),
        "{urls:?}"
    );
    assert!(urls.contains(&format!("https://api.test:{port}/v1/other").as_str()));
    let h = entries
        .iter()
        .find(|e| e["request"]["method"] == "POST")
        .unwrap();
    assert_eq!(h["response"]["status"], 200);
    assert_eq!(h["response"]["statusText"], "OK");
    assert_eq!(h["serverIPAddress"], "127.0.0.2");
    assert_eq!(h["request"]["postData"]["mimeType"], "application/json");
    let posted = h["request"]["postData"]["text"].as_str().unwrap();
    assert!(posted.contains("for the record"), "{posted}");
    assert!(!posted.contains(CARD), "{posted}");
    assert!(!har.to_string().contains("sk-evidence"));
    assert!(h["timings"]["wait"].as_f64().unwrap() >= 0.0);
    assert!(h["startedDateTime"].as_str().unwrap().contains('T'));

    // NDJSON honours the filters: requests only, then connections only.
    let lines = |args: &[&str]| -> Vec<Value> {
        let mut a = vec!["events", "export", "--format", "ndjson"];
        a.extend_from_slice(args);
        ok(agent.cli(&a), "export ndjson")
            .lines()
            .map(|l| serde_json::from_str(l).expect("an NDJSON line"))
            .collect()
    };
    let http = lines(&["--http", "--dest", &dst]);
    assert_eq!(http.len(), 2, "{http:#?}");
    assert!(http.iter().all(|e| e["kind"] == "http"));
    let only_conns = lines(&["--kind", "connection", "--dest", &dst]);
    assert_eq!(only_conns.len(), 2, "{only_conns:#?}");
    assert!(only_conns.iter().all(|e| e["kind"] == "connection"));
    assert!(lines(&["--dest", &dst, "--verdict", "block"]).is_empty());

    // --output: a file only root reads.
    let file = agent.state_dir.with_extension("export.har");
    ok(
        agent.cli(&[
            "events",
            "export",
            "--format",
            "har",
            "--dest",
            &dst,
            "--output",
            file.to_str().unwrap(),
        ]),
        "export --output",
    );
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let from_file: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(from_file["log"]["entries"].as_array().unwrap().len(), 2);

    // With the agent stopped: the same, straight from the store.
    let st = agent.stop_with(libc::SIGTERM);
    assert!(st.success(), "agent exit {st}");
    let text = ok(agent.cli(&["events", "show", &id]), "events show (stopped)");
    assert_shows_the_post(&text, port);
    let out = agent.cli(&["events", "show", "987654321"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no event with id 987654321"));
    let har: Value = serde_json::from_str(&ok(
        agent.cli(&["events", "export", "--format", "har", "--dest", &dst]),
        "export har (stopped)",
    ))
    .unwrap();
    assert_eq!(har["log"]["entries"].as_array().unwrap().len(), 2);
}
