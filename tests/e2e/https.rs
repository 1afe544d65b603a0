//! TLS termination and per-request records, end to end: real clients (curl,
//! python3, node) in monitored cgroups, a TLS test server of the test's own
//! on 127.0.0.2 with certificates from a test CA the agent is told to trust
//! (`--upstream-root`), and the events read back through `guard-agent events`.

use std::{collections::BTreeSet, process::Output};

use guard_harness::{
    external_v4, require_root, run_ok,
    servers::{pattern_block, pattern_sha256, ConnectProxy},
    tls_server::{CertKind, TestCa, TlsFront, TlsServer},
    Agent, AgentOptions, TestCgroup,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// An agent monitoring `cg`, intercepting 127.0.0.2, trusting `ca` upstream.
fn agent_for(cg: &TestCgroup, ca: &TestCa, extra: &[&str]) -> Agent {
    let mut extra_args = vec![
        "--upstream-root".to_owned(),
        ca.pem_path().to_str().unwrap().to_owned(),
    ];
    extra_args.extend(extra.iter().map(|s| s.to_string()));
    Agent::start(AgentOptions {
        cgroups: vec![cg.path.clone()],
        intercept: vec!["127.0.0.2/32".into()],
        extra_args,
        ..Default::default()
    })
}

fn str_field<'a>(e: &'a Value, k: &str) -> &'a str {
    e[k].as_str()
        .unwrap_or_else(|| panic!("field {k} missing in {e:#}"))
}

/// The `path` of each JSON answer curl printed, one per line (`-w "\n"`
/// after each of several URLs).
fn answered_paths(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["path"].clone())
        .collect()
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): stdout {:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn header<'a>(list: &'a Value, name: &str) -> Option<&'a str> {
    list.as_array()?
        .iter()
        .find(|kv| kv[0].as_str() == Some(name))
        .and_then(|kv| kv[1].as_str())
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn resolve(name: &str, port: u16) -> String {
    format!("{name}:{port}:127.0.0.2")
}

/// The event whose error says `text`.
fn by_error<'a>(events: &'a [Value], text: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["error"].as_str().is_some_and(|e| e.contains(text)))
        .unwrap_or_else(|| panic!("no event says {text:?}: {events:#?}"))
}

/// The http event whose path is `path`.
fn by_path<'a>(events: &'a [Value], path: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["http"]["path"] == path)
        .unwrap_or_else(|| panic!("no http event for {path}: {events:#?}"))
}

#[test]
fn curl_over_http1_and_http2_through_exec_is_terminated_forwarded_and_recorded() {
    require_root();
    let ca = TestCa::new();
    let server = TlsServer::start(external_v4(0), &ca, CertKind::Valid);
    let port = server.port();
    let cg = TestCgroup::new("https-curl");
    let agent = agent_for(&cg, &ca, &[]);

    // HTTP/1.1, a GET with a query and a header.
    let out = run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "20",
        "--http1.1",
        "--resolve",
        &resolve("api.test", port),
        "-H",
        "X-Test: one",
        &format!("https://api.test:{port}/v1/items?page=2"),
    ]));
    let body = json_of(&out);
    assert_eq!(body["method"], "GET");
    assert_eq!(body["path"], "/v1/items");
    assert_eq!(body["query"], "page=2");
    assert_eq!(body["version"], "HTTP/1.1");
    assert_eq!(
        body["alpn"], "http/1.1",
        "the agent offered the client's ALPN upstream"
    );
    assert_eq!(body["host"], format!("api.test:{port}"));

    // HTTP/2, a POST with a body.
    let payload = "name=ada&note=hello over h2";
    let out = run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "20",
        "--http2",
        "--resolve",
        &resolve("api.test", port),
        "-d",
        payload,
        &format!("https://api.test:{port}/v2/submit"),
    ]));
    let body = json_of(&out);
    assert_eq!(body["method"], "POST");
    assert_eq!(body["path"], "/v2/submit");
    assert_eq!(body["version"], "HTTP/2.0");
    assert_eq!(body["alpn"], "h2");
    assert_eq!(body["body_len"], payload.len());
    assert_eq!(body["body_sha256"], sha256_hex(payload.as_bytes()));

    let dst = server.addr.to_string();
    let events = agent.wait_events(&["--http", "--dest", &dst], 2);
    assert_eq!(events.len(), 2, "{events:#?}");

    let h1 = by_path(&events, "/v1/items");
    assert_eq!(str_field(h1, "kind"), "http");
    assert_eq!(h1["http"]["method"], "GET");
    assert_eq!(h1["http"]["scheme"], "https");
    assert_eq!(h1["http"]["host"], "api.test");
    assert_eq!(h1["http"]["query"], "page=2");
    assert_eq!(h1["http"]["status"], 200);
    assert_eq!(h1["http"]["version"], "HTTP/1.1");
    assert_eq!(
        header(&h1["http"]["request_headers"], "x-test"),
        Some("one")
    );
    assert_eq!(
        header(&h1["http"]["response_headers"], "x-test-server"),
        Some("tls")
    );
    assert!(h1["http"]["response_bytes"].as_u64().unwrap() > 0, "{h1:#}");
    assert_eq!(h1["tls"]["sni"], "api.test");
    assert_eq!(h1["tls"]["alpn"], "http/1.1");
    assert_eq!(h1["tls"]["upstream_alpn"], "http/1.1");
    assert_eq!(h1["tls"]["passthrough"], false);
    assert_eq!(str_field(h1, "verdict"), "allow");

    let h2 = by_path(&events, "/v2/submit");
    assert_eq!(h2["http"]["method"], "POST");
    assert_eq!(h2["http"]["host"], "api.test");
    assert_eq!(h2["http"]["status"], 200);
    assert_eq!(h2["http"]["version"], "HTTP/2");
    assert_eq!(h2["http"]["request_bytes"], payload.len());
    assert_eq!(h2["tls"]["sni"], "api.test");
    assert_eq!(h2["tls"]["alpn"], "h2");
    assert_eq!(h2["tls"]["upstream_alpn"], "h2");
    assert!(h2["tls"]["version"].as_str().unwrap().starts_with("TLSv1_"));

    for e in [h1, h2] {
        assert_eq!(str_field(e, "exe"), "/usr/bin/curl");
        assert_eq!(str_field(e, "user"), "root");
        assert_eq!(e["uid"], 0);
        assert_eq!(str_field(e, "dst"), dst);
        assert!(str_field(e, "cgroup").contains("/exec/exec-"), "{e:#}");
        assert!(str_field(e, "cmdline").contains("api.test"), "{e:#}");
    }

    // The two connections are recorded too, with the TLS parameters, and
    // each request links to its connection.
    let conns = agent.wait_events(&["--kind", "connection", "--dest", &dst], 2);
    for e in [h1, h2] {
        let c = conns
            .iter()
            .find(|c| c["conn_id"] == e["conn_id"])
            .unwrap_or_else(|| panic!("no connection for {e:#}: {conns:#?}"));
        assert_eq!(c["tls"]["sni"], "api.test");
        assert_eq!(str_field(c, "host"), "api.test");
        assert_eq!(str_field(c, "verdict"), "allow");
        assert!(c["error"].is_null(), "{c:#}");
    }
    assert_eq!(server.requests().len(), 2);

    // The server closes a keep-alive connection without saying so (as an
    // idle timeout does): the next request goes upstream on a new
    // connection, and the client keeps its own.
    let out = run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "20",
        "--http1.1",
        "--resolve",
        &resolve("api.test", port),
        "-w",
        "\n",
        &format!("https://api.test:{port}/drop/one"),
        &format!("https://api.test:{port}/drop/two"),
    ]));
    assert_eq!(answered_paths(&out), ["/drop/one", "/drop/two"]);
    let events = agent.wait_events(&["--http", "--dest", &dst], 4);
    let (one, two) = (by_path(&events, "/drop/one"), by_path(&events, "/drop/two"));
    assert_eq!(one["conn_id"], two["conn_id"], "{events:#?}");
    assert_eq!(two["http"]["status"], 200, "{two:#}");
    assert_eq!(server.connections(), 4);
}

const PY_RESOLVE: &str = r#"
import socket
_orig = socket.getaddrinfo
def _ga(host, *a, **k):
    return _orig('127.0.0.2' if host == 'api.test' else host, *a, **k)
socket.getaddrinfo = _ga
"#;

#[test]
fn python_urllib_and_node_fetch_through_exec_trust_the_bundle_and_are_recorded() {
    require_root();
    let ca = TestCa::new();
    let server = TlsServer::start(external_v4(0), &ca, CertKind::Valid);
    let port = server.port();
    let cg = TestCgroup::new("https-langs");
    let agent = agent_for(&cg, &ca, &[]);

    let py = format!(
        "{PY_RESOLVE}
import urllib.request
req = urllib.request.Request('https://api.test:{port}/py/upload', data=b'p' * 5000, method='POST')
print(urllib.request.urlopen(req, timeout=20).read().decode())
"
    );
    let out = run_ok(agent.exec("python3").args(["-c", &py]));
    let body = json_of(&out);
    assert_eq!(body["method"], "POST");
    assert_eq!(body["path"], "/py/upload");
    assert_eq!(body["body_len"], 5000);
    assert_eq!(body["body_sha256"], sha256_hex(&[b'p'; 5000]));

    // node 20's fetch (undici) resolves through dns.lookup; NODE_EXTRA_CA_CERTS
    // from exec makes it trust the Guard CA.
    let js = format!(
        "const dns = require('dns');
const orig = dns.lookup;
dns.lookup = (h, o, cb) => orig(h === 'api.test' ? '127.0.0.2' : h, o, cb);
fetch('https://api.test:{port}/node/get?lang=js', {{ headers: {{ 'x-client': 'node' }} }})
  .then(r => r.text())
  .then(t => console.log(t))
  .catch(e => {{ console.error(e, e.cause); process.exit(1); }});"
    );
    let out = run_ok(agent.exec("node").args(["-e", &js]));
    let body = json_of(&out);
    assert_eq!(body["method"], "GET");
    assert_eq!(body["path"], "/node/get");
    assert_eq!(body["query"], "lang=js");

    let dst = server.addr.to_string();
    let events = agent.wait_events(&["--http", "--dest", &dst], 2);
    let py_ev = by_path(&events, "/py/upload");
    assert!(str_field(py_ev, "exe").contains("python3"), "{py_ev:#}");
    assert_eq!(py_ev["http"]["method"], "POST");
    assert_eq!(py_ev["http"]["status"], 200);
    assert_eq!(py_ev["http"]["request_bytes"], 5000);
    assert_eq!(py_ev["tls"]["sni"], "api.test");
    let node_ev = by_path(&events, "/node/get");
    assert!(str_field(node_ev, "exe").contains("node"), "{node_ev:#}");
    assert_eq!(node_ev["http"]["status"], 200);
    assert_eq!(node_ev["http"]["host"], "api.test");
    assert_eq!(
        header(&node_ev["http"]["request_headers"], "x-client"),
        Some("node")
    );
    assert_eq!(node_ev["tls"]["sni"], "api.test");
}

#[test]
fn a_client_that_does_not_trust_the_guard_ca_fails_and_the_event_says_why() {
    require_root();
    let ca = TestCa::new();
    let server = TlsServer::start(external_v4(0), &ca, CertKind::Valid);
    let port = server.port();
    let cg = TestCgroup::new("https-untrusted");
    let agent = agent_for(&cg, &ca, &[]);

    // Straight in the cgroup, without the bundle: system roots only.
    let out = cg
        .command("curl")
        .env_remove("SSL_CERT_FILE")
        .env_remove("CURL_CA_BUNDLE")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--resolve",
            &resolve("api.test", port),
            &format!("https://api.test:{port}/secret"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(60),
        "curl must fail certificate verification: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate"), "{err}");

    let dst = server.addr.to_string();
    let conns = agent.wait_events(&["--kind", "connection", "--dest", &dst], 1);
    let c = &conns[0];
    assert_eq!(str_field(c, "exe"), "/usr/bin/curl");
    assert_eq!(str_field(c, "verdict"), "error");
    let why = str_field(c, "error");
    assert!(
        why.contains("the client rejected the TLS handshake"),
        "{c:#}"
    );
    assert!(why.contains("Guard CA"), "{c:#}");
    assert_eq!(str_field(c, "host"), "api.test", "the SNI is recorded");
    assert_eq!(c["tls"]["sni"], "api.test", "{c:#}");
    assert_eq!(c["tls"]["passthrough"], false);
    assert!(agent.events(&["--http", "--dest", &dst]).is_empty());
    assert!(server.requests().is_empty(), "no request left the agent");
}

#[test]
fn an_upstream_with_an_invalid_certificate_gives_the_client_a_502_that_names_the_problem() {
    require_root();
    let ca = TestCa::new();
    let expired = TlsServer::start(external_v4(0), &ca, CertKind::Expired);
    let wrong = TlsServer::start(external_v4(0), &ca, CertKind::WrongName);
    let cg = TestCgroup::new("https-badcert");
    let agent = agent_for(&cg, &ca, &[]);

    for (server, path, problem) in [
        (&expired, "/expired", "certificate has expired"),
        (
            &wrong,
            "/wrong-name",
            "certificate is not valid for name api.test",
        ),
    ] {
        let port = server.port();
        let out = run_ok(agent.exec("curl").args([
            "-sS",
            "--max-time",
            "20",
            "--resolve",
            &resolve("api.test", port),
            "-w",
            "\n%{http_code}",
            &format!("https://api.test:{port}{path}"),
        ]));
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').unwrap();
        assert_eq!(code, "502", "{text}");
        let body: Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"], "upstream TLS failed", "{body:#}");
        assert!(
            body["problem"].as_str().unwrap().contains(problem),
            "{body:#}"
        );

        let dst = server.addr.to_string();
        let ev = agent.wait_events(&["--http", "--dest", &dst], 1);
        let e = by_path(&ev, path);
        assert_eq!(e["http"]["status"], 502);
        assert_eq!(str_field(e, "verdict"), "error");
        assert!(str_field(e, "error").contains(problem), "{e:#}");
        assert_eq!(body["event_id"], e["id"]);
        let conns = agent.wait_events(&["--kind", "connection", "--dest", &dst], 1);
        assert!(
            str_field(&conns[0], "error").contains(problem),
            "{:#}",
            conns[0]
        );
        assert!(server.requests().is_empty(), "nothing reached {path}");
    }
}

#[test]
fn passthrough_snis_are_spliced_with_the_clients_own_handshake() {
    require_root();
    let ca = TestCa::new();
    let server = TlsServer::start(external_v4(0), &ca, CertKind::Valid);
    let port = server.port();
    let cg = TestCgroup::new("https-passthrough");
    let agent = agent_for(&cg, &ca, &["--tls-passthrough", "*.pinned.test"]);

    // The client trusts only the test CA: it works only if it talks to the
    // test server's own certificate.
    let out = run_ok(cg.command("curl").args([
        "-sS",
        "--max-time",
        "20",
        "--cacert",
        ca.pem_path().to_str().unwrap(),
        "--resolve",
        &resolve("bank.pinned.test", port),
        &format!("https://bank.pinned.test:{port}/pinned"),
    ]));
    let body = json_of(&out);
    assert_eq!(body["path"], "/pinned");
    assert_eq!(body["alpn"], "h2", "curl's own ALPN reached the server");

    let dst = server.addr.to_string();
    let conns = agent.wait_events(&["--kind", "connection", "--dest", &dst], 1);
    let c = &conns[0];
    assert_eq!(c["tls"]["passthrough"], true, "{c:#}");
    assert_eq!(c["tls"]["sni"], "bank.pinned.test");
    assert_eq!(str_field(c, "host"), "bank.pinned.test");
    assert_eq!(str_field(c, "verdict"), "allow");
    assert!(c["bytes_out"].as_u64().unwrap() > 0);
    assert!(c["bytes_in"].as_u64().unwrap() > 0);
    assert!(agent.events(&["--http", "--dest", &dst]).is_empty());

    // A name outside the glob on the same server is terminated: the test
    // CA alone no longer verifies it.
    let out = cg
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            ca.pem_path().to_str().unwrap(),
            "--resolve",
            &resolve("api.test", port),
            &format!("https://api.test:{port}/not-pinned"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(60), "{out:?}");
}

#[test]
fn a_hundred_concurrent_http2_streams_on_one_connection_arrive_intact() {
    require_root();
    let ca = TestCa::new();
    let server = TlsServer::start(external_v4(0), &ca, CertKind::Valid);
    let port = server.port();
    let cg = TestCgroup::new("https-h2");
    let agent = agent_for(&cg, &ca, &[]);
    let dir = tempfile::tempdir().unwrap();

    run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "60",
        "--http2",
        "--parallel",
        "--parallel-max",
        "100",
        "--resolve",
        &resolve("api.test", port),
        &format!("https://api.test:{port}/stream/[1-100]"),
        "-o",
        &format!("{}/#1.json", dir.path().display()),
    ]));
    for i in 1..=100 {
        let text = std::fs::read(dir.path().join(format!("{i}.json"))).unwrap();
        let body: Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(body["path"], format!("/stream/{i}"));
        assert_eq!(body["version"], "HTTP/2.0");
    }

    let dst = server.addr.to_string();
    let events = agent.wait_events(&["--http", "--dest", &dst], 100);
    assert_eq!(events.len(), 100);
    let paths: BTreeSet<&str> = events
        .iter()
        .map(|e| e["http"]["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths.len(), 100);
    let conn_ids: BTreeSet<u64> = events
        .iter()
        .map(|e| e["conn_id"].as_u64().unwrap())
        .collect();
    assert_eq!(conn_ids.len(), 1, "one client connection carried them all");
    for e in &events {
        assert_eq!(e["http"]["status"], 200, "{e:#}");
        assert_eq!(e["http"]["version"], "HTTP/2");
        assert_eq!(e["tls"]["alpn"], "h2");
    }
    let conns = agent.wait_events(&["--kind", "connection", "--dest", &dst], 1);
    assert_eq!(conns.len(), 1, "{conns:#?}");
    assert_eq!(server.requests().len(), 100);
    assert_eq!(
        server.connections(),
        1,
        "the agent multiplexed them on one upstream connection"
    );
}

const HUNDRED_MIB: u64 = 100 << 20;

#[test]
fn a_hundred_mib_upload_and_download_over_tls_arrive_intact_in_bounded_memory() {
    require_root();
    let ca = TestCa::new();
    let server = TlsServer::start(external_v4(0), &ca, CertKind::Valid);
    let port = server.port();
    let cg = TestCgroup::new("https-large");
    let agent = agent_for(&cg, &ca, &[]);
    let dir = tempfile::tempdir().unwrap();

    // The upload: 100 MiB of the pattern, streamed by curl from a file.
    let upload = dir.path().join("upload.bin");
    {
        let block = pattern_block();
        let mut f = std::fs::File::create(&upload).unwrap();
        for _ in 0..(HUNDRED_MIB / block.len() as u64) {
            std::io::Write::write_all(&mut f, &block).unwrap();
        }
    }
    let out = run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "300",
        "--http1.1",
        "--resolve",
        &resolve("api.test", port),
        "-H",
        "Content-Type: application/octet-stream",
        "-X",
        "POST",
        "-T",
        upload.to_str().unwrap(),
        &format!("https://api.test:{port}/upload"),
    ]));
    let body = json_of(&out);
    assert_eq!(body["body_len"], HUNDRED_MIB);
    assert_eq!(body["body_sha256"], pattern_sha256(HUNDRED_MIB));
    std::fs::remove_file(&upload).unwrap();

    // The download, over HTTP/2.
    let download = dir.path().join("download.bin");
    run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "300",
        "--http2",
        "--resolve",
        &resolve("api.test", port),
        "-o",
        download.to_str().unwrap(),
        &format!("https://api.test:{port}/download?bytes={HUNDRED_MIB}"),
    ]));
    let got = std::fs::read(&download).unwrap();
    assert_eq!(got.len() as u64, HUNDRED_MIB);
    assert_eq!(sha256_hex(&got), pattern_sha256(HUNDRED_MIB));
    drop(got);

    let dst = server.addr.to_string();
    let events = agent.wait_events(&["--http", "--dest", &dst], 2);
    let up = by_path(&events, "/upload");
    assert_eq!(up["http"]["status"], 200);
    assert_eq!(up["http"]["request_bytes"], HUNDRED_MIB, "{up:#}");
    let down = by_path(&events, "/download");
    assert_eq!(down["http"]["status"], 200);
    assert_eq!(down["http"]["response_bytes"], HUNDRED_MIB, "{down:#}");
    let conns = agent.wait_events(&["--kind", "connection", "--dest", &dst], 2);
    assert!(conns
        .iter()
        .any(|c| c["bytes_out"].as_u64().unwrap() > HUNDRED_MIB));
    assert!(conns
        .iter()
        .any(|c| c["bytes_in"].as_u64().unwrap() > HUNDRED_MIB));

    // The agent streamed rather than buffered: its peak RSS stays far
    // below the 200 MiB it carried.
    let hwm_kib = agent.proc_status_kib("VmHWM");
    eprintln!("agent VmHWM after 2 x 100 MiB: {} MiB", hwm_kib / 1024);
    assert!(
        hwm_kib < 300 * 1024,
        "agent peak RSS {} MiB for two 100 MiB transfers",
        hwm_kib / 1024
    );
}

#[test]
fn a_malformed_client_hello_and_random_bytes_close_that_connection_only() {
    require_root();
    let ca = TestCa::new();
    let server = TlsServer::start(external_v4(0), &ca, CertKind::Valid);
    let port = server.port();
    let cg = TestCgroup::new("https-garbage");
    let agent = agent_for(&cg, &ca, &[]);

    let py = format!(
        r#"
import socket, sys
def attempt(payload):
    s = socket.create_connection(('127.0.0.2', {port}), timeout=20)
    s.sendall(payload)
    n = 0
    try:
        while True:
            d = s.recv(4096)
            if not d:
                break
            n += len(d)
    except ConnectionResetError:
        print('reset')
        return
    except socket.timeout:
        print('still open')
        sys.exit(1)
    print('closed', n)
# A TLS handshake record that claims to be a ClientHello, then garbage.
attempt(b'\x16\x03\x01\x00\x10' + b'\x01\x00\x00\x0c' + b'garbage-garb')
# Bytes that are no protocol at all.
attempt(bytes([0, 0xff, 0x13, 0x37]) + bytes(range(60)))
"#
    );
    let out = run_ok(cg.command("python3").args(["-c", &py]));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0], "reset", "the agent resets a malformed hello");

    let dst = server.addr.to_string();
    let conns = agent.wait_events(&["--kind", "connection", "--dest", &dst], 2);
    let bad = by_error(&conns, "malformed TLS ClientHello");
    assert_eq!(str_field(bad, "verdict"), "error");
    assert!(str_field(bad, "exe").contains("python3"));
    // The random bytes were spliced to the server (which closed on them).
    let opaque = conns
        .iter()
        .find(|c| c["bytes_out"] == 64)
        .unwrap_or_else(|| panic!("no event for the random bytes: {conns:#?}"));
    assert!(opaque["tls"].is_null(), "{opaque:#}");
    assert!(agent.events(&["--http", "--dest", &dst]).is_empty());

    // The agent carries on: a normal request right after works.
    let out = run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "20",
        "--resolve",
        &resolve("api.test", port),
        &format!("https://api.test:{port}/after"),
    ]));
    assert_eq!(json_of(&out)["path"], "/after");
    let ev = agent.wait_events(&["--http", "--dest", &dst], 1);
    assert_eq!(by_path(&ev, "/after")["http"]["status"], 200);
}

const PY_WEBSOCKET: &str = r#"
import base64, hashlib, os, socket, sys
host, port, tls = sys.argv[1], int(sys.argv[2]), sys.argv[3] == 'tls'
s = socket.create_connection(('127.0.0.2', port), timeout=20)
if tls:
    import ssl
    s = ssl.create_default_context().wrap_socket(s, server_hostname=host)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall((f'GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n'
           f'Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n'
           'Sec-WebSocket-Version: 13\r\n\r\n').encode())
buf = b''
while b'\r\n\r\n' not in buf:
    d = s.recv(4096)
    if not d:
        sys.exit('closed during the handshake: %r' % buf)
    buf += d
head, buf = buf.split(b'\r\n\r\n', 1)
print(head.split(b'\r\n')[0].decode())
accept = base64.b64encode(hashlib.sha1((key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').encode()).digest())
assert accept in head, head
def need(n):
    global buf
    while len(buf) < n:
        d = s.recv(65536)
        if not d:
            sys.exit('closed mid-frame')
        buf += d
    out, buf = buf[:n], buf[n:]
    return out
def send(op, payload):
    mask = os.urandom(4)
    n = len(payload)
    hdr = bytes([0x80 | op])
    if n < 126:
        hdr += bytes([0x80 | n])
    elif n < 65536:
        hdr += bytes([0x80 | 126]) + n.to_bytes(2, 'big')
    else:
        hdr += bytes([0x80 | 127]) + n.to_bytes(8, 'big')
    s.sendall(hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
def recv():
    b0, b1 = need(2)
    n = b1 & 0x7f
    if n == 126:
        n = int.from_bytes(need(2), 'big')
    elif n == 127:
        n = int.from_bytes(need(8), 'big')
    return b0 & 0x0f, need(n)
send(1, b'hello websocket')
op, p = recv()
print('echo', op, p.decode())
big = os.urandom(100000)
send(2, big)
op, p = recv()
print('big', op, p == big)
send(8, b'\x03\xe8')
op, p = recv()
print('close', op)
"#;

#[test]
fn websocket_upgrades_are_carried_and_recorded() {
    require_root();
    let ca = TestCa::new();
    let plain = TlsServer::start_plain(external_v4(0));
    let cg = TestCgroup::new("https-ws");
    let agent = agent_for(&cg, &ca, &[]);

    let out = run_ok(cg.command("python3").args([
        "-c",
        PY_WEBSOCKET,
        "127.0.0.2",
        &plain.port().to_string(),
        "plain",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "HTTP/1.1 101 Switching Protocols",
            "echo 1 hello websocket",
            "big 2 True",
            "close 8"
        ],
        "{text}"
    );

    let dst = plain.addr.to_string();
    let ev = agent.wait_events(&["--http", "--dest", &dst], 1);
    let e = by_path(&ev, "/ws");
    assert_eq!(e["http"]["status"], 101);
    assert_eq!(e["http"]["upgrade"], "websocket");
    assert_eq!(e["http"]["scheme"], "http");
    // The exchange's event carries the session after the handshake: its
    // duration and the frames' bytes each way (100 000 B of binary frame).
    assert!(e["http"]["upgrade_ms"].as_f64().is_some(), "{e:#}");
    assert!(
        e["http"]["upgrade_bytes_out"].as_u64().unwrap() > 100_000,
        "{e:#}"
    );
    assert!(
        e["http"]["upgrade_bytes_in"].as_u64().unwrap() > 100_000,
        "{e:#}"
    );
    assert!(e["error"].is_null(), "{e:#}");
    let conns = agent.wait_events(&["--kind", "connection", "--dest", &dst], 1);
    assert!(
        conns[0]["bytes_out"].as_u64().unwrap() > 100_000,
        "{:#}",
        conns[0]
    );
    assert!(conns[0]["bytes_in"].as_u64().unwrap() > 100_000);
}

#[test]
fn plaintext_http2_with_prior_knowledge_is_inspected_like_http1() {
    // h2c with prior knowledge (curl --http2-prior-knowledge, plaintext
    // gRPC): through the same pipeline as plaintext HTTP/1, upstream in
    // HTTP/2 too. It used to be carried as opaque bytes, uninspected.
    require_root();
    let ca = TestCa::new();
    let plain = TlsServer::start_plain(external_v4(0));
    let cg = TestCgroup::new("https-h2c");
    let agent = agent_for(&cg, &ca, &[]);
    let sent = format!("key={AWS_KEY}");
    let out = run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "20",
        "--http2-prior-knowledge",
        "-d",
        &sent,
        &format!("http://127.0.0.2:{}/h2c/upload", plain.port()),
    ]));
    let body = json_of(&out);
    assert_eq!(body["path"], "/h2c/upload", "{body:#}");
    assert_eq!(
        body["version"], "HTTP/2.0",
        "the upstream leg is HTTP/2 too"
    );
    assert_eq!(body["body_len"], sent.len(), "masking keeps the length");
    assert_ne!(
        body["body_sha256"],
        sha256_hex(sent.as_bytes()),
        "the key reached the server unmasked over h2c"
    );
    let dst = plain.addr.to_string();
    let ev = agent.wait_events(&["--http", "--dest", &dst], 1);
    let e = by_path(&ev, "/h2c/upload");
    assert_eq!(e["http"]["version"], "HTTP/2", "{e:#}");
    assert_eq!(e["http"]["scheme"], "http", "{e:#}");
    assert_eq!(e["http"]["method"], "POST", "{e:#}");
    assert_eq!(str_field(e, "verdict"), "mask", "{e:#}");
    assert_eq!(e["findings"][0]["detector"], "aws-access-key-id", "{e:#}");

    // An upgrade to h2c (curl --http2 on an http:// URL) is declined, so
    // the connection stays HTTP/1.1 and every request on it is read.
    let out = run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "20",
        "--http2",
        &format!("http://127.0.0.2:{}/h2c/upgrade", plain.port()),
    ]));
    assert_eq!(json_of(&out)["version"], "HTTP/1.1");
    assert!(
        plain.header_values("/h2c/upgrade", "upgrade").is_empty(),
        "the h2c upgrade reached the server"
    );
    let ev = agent.wait_events(&["--http", "--dest", &dst], 2);
    let e = by_path(&ev, "/h2c/upgrade");
    assert_eq!(e["http"]["status"], 200, "{e:#}");
    assert!(e["http"]["upgrade"].is_null(), "{e:#}");

    let all = serde_json::to_string(&agent.events(&[])).unwrap();
    assert!(
        !all.contains(AWS_KEY),
        "the store holds the key sent over h2c"
    );
}

#[test]
fn websocket_over_tls_is_carried_and_recorded() {
    require_root();
    let ca = TestCa::new();
    let server = TlsServer::start(external_v4(0), &ca, CertKind::Valid);
    let cg = TestCgroup::new("https-wss");
    let agent = agent_for(&cg, &ca, &[]);

    // Python's ssl offers no ALPN here: the agent speaks HTTP/1.1 both ways.
    let out = run_ok(agent.exec("python3").args([
        "-c",
        PY_WEBSOCKET,
        "api.test",
        &server.port().to_string(),
        "tls",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("echo 1 hello websocket"), "{text}");
    assert!(text.contains("big 2 True"), "{text}");
    assert!(text.contains("close 8"), "{text}");

    let dst = server.addr.to_string();
    let ev = agent.wait_events(&["--http", "--dest", &dst], 1);
    let e = by_path(&ev, "/ws");
    assert_eq!(e["http"]["status"], 101);
    assert_eq!(e["http"]["upgrade"], "websocket");
    assert_eq!(e["http"]["scheme"], "https");
    assert_eq!(e["tls"]["sni"], "api.test");
    assert!(e["http"]["upgrade_ms"].as_f64().is_some(), "{e:#}");
    assert!(
        e["http"]["upgrade_bytes_out"].as_u64().unwrap() > 100_000,
        "{e:#}"
    );
    assert!(
        e["http"]["upgrade_bytes_in"].as_u64().unwrap() > 100_000,
        "{e:#}"
    );
    // The connection ends when the WebSocket does, its frames counted.
    let conns = agent.wait_events(&["--kind", "connection", "--dest", &dst], 1);
    assert!(
        conns[0]["bytes_out"].as_u64().unwrap() > 100_000,
        "{:#}",
        conns[0]
    );
}

const PY_WEBSOCKET_STAYS_OPEN: &str = r#"
import base64, os, socket, sys
port = int(sys.argv[1])
s = socket.create_connection(('127.0.0.2', port), timeout=120)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall((f'GET /ws HTTP/1.1\r\nHost: 127.0.0.2:{port}\r\nUpgrade: websocket\r\n'
           f'Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n'
           'Sec-WebSocket-Version: 13\r\n\r\n').encode())
buf = b''
while b'\r\n\r\n' not in buf:
    buf += s.recv(4096)
mask = os.urandom(4)
payload = b'still here'
s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
while len(buf.split(b'\r\n\r\n', 1)[1]) < 2 + len(payload):
    buf += s.recv(4096)
print('open', flush=True)
while s.recv(4096):
    pass
print('closed', flush=True)
"#;

#[test]
fn an_agent_stopping_during_a_websocket_session_ends_it_and_records_it() {
    require_root();
    let ca = TestCa::new();
    let plain = TlsServer::start_plain(external_v4(0));
    let cg = TestCgroup::new("https-ws-stop");
    let mut agent = agent_for(&cg, &ca, &[]);

    let mut client = cg
        .command("python3")
        .args(["-c", PY_WEBSOCKET_STAYS_OPEN, &plain.port().to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    guard_harness::read_line_until(
        &mut client,
        |l| l == "open",
        std::time::Duration::from_secs(30),
    );

    // SIGTERM with the session open: the agent still stops (it does not
    // wait for the WebSocket to end)...
    let mut child = agent.child.take().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent did not stop:\n{}", agent.log_text());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status}\n{}", agent.log_text());
    let _ = client.kill();
    let _ = client.wait();

    // ...and the store holds the exchange, saying how it ended.
    let dst = plain.addr.to_string();
    let ev = guard_harness::events_in(&agent.state_dir, &["--http", "--dest", &dst]);
    let e = by_path(&ev, "/ws");
    assert_eq!(e["http"]["upgrade"], "websocket");
    assert!(
        str_field(e, "error").contains("agent stopped while the upgraded session was open"),
        "{e:#}"
    );
    assert!(e["http"]["upgrade_ms"].as_f64().is_some(), "{e:#}");
    assert!(
        e["http"]["upgrade_bytes_out"].as_u64().unwrap() > 0,
        "{e:#}"
    );
    assert!(e["http"]["upgrade_bytes_in"].as_u64().unwrap() > 0, "{e:#}");
}

#[test]
fn https_to_an_ip_literal_without_sni_and_over_ipv6_is_terminated_and_recorded() {
    require_root();
    let ca = TestCa::new();
    let v4 = TlsServer::start(external_v4(0), &ca, CertKind::Valid);
    let v6 = TlsServer::start("[::1]:0".parse().unwrap(), &ca, CertKind::Valid);
    let cg = TestCgroup::new("https-ip");
    let agent = Agent::start(AgentOptions {
        cgroups: vec![cg.path.clone()],
        intercept: vec!["127.0.0.2/32".into(), "::1/128".into()],
        extra_args: vec![
            "--upstream-root".into(),
            ca.pem_path().to_str().unwrap().into(),
        ],
        ..Default::default()
    });

    // No SNI: the agent verifies the upstream by IP and mints a leaf for it.
    let out = run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "20",
        &format!("https://127.0.0.2:{}/by-ip", v4.port()),
    ]));
    assert_eq!(json_of(&out)["path"], "/by-ip");
    let dst = v4.addr.to_string();
    let ev = agent.wait_events(&["--http", "--dest", &dst], 1);
    let e = by_path(&ev, "/by-ip");
    assert_eq!(e["http"]["status"], 200);
    assert_eq!(e["http"]["host"], "127.0.0.2");
    assert!(e["tls"]["sni"].is_null(), "{e:#}");

    // IPv6, with a name.
    let out = run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "20",
        "--http2",
        "--resolve",
        &format!("api.test:{}:[::1]", v6.port()),
        &format!("https://api.test:{}/over-v6", v6.port()),
    ]));
    let body = json_of(&out);
    assert_eq!(body["path"], "/over-v6");
    assert_eq!(body["alpn"], "h2");
    let dst = v6.addr.to_string();
    let ev = agent.wait_events(&["--http", "--dest", &dst], 1);
    let e = by_path(&ev, "/over-v6");
    assert_eq!(e["http"]["status"], 200);
    assert_eq!(e["http"]["host"], "api.test");
    assert_eq!(e["tls"]["sni"], "api.test");
    assert_eq!(e["tls"]["alpn"], "h2");
    assert_eq!(str_field(e, "dst"), dst);
}

#[test]
fn keep_alive_requests_on_one_http1_connection_are_each_recorded() {
    require_root();
    let ca = TestCa::new();
    let server = TlsServer::start(external_v4(0), &ca, CertKind::Valid);
    let port = server.port();
    let cg = TestCgroup::new("https-keepalive");
    let agent = agent_for(&cg, &ca, &[]);

    let urls: Vec<String> = (1..=3)
        .map(|i| format!("https://api.test:{port}/ka/{i}"))
        .collect();
    let mut cmd = agent.exec("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "20",
        "--http1.1",
        "--resolve",
        &resolve("api.test", port),
        "-w",
        "\n",
    ])
    .args(&urls);
    let out = run_ok(&mut cmd);
    let bodies: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(bodies.len(), 3);
    for (i, b) in bodies.iter().enumerate() {
        assert_eq!(b["path"], format!("/ka/{}", i + 1));
    }

    let dst = server.addr.to_string();
    let events = agent.wait_events(&["--http", "--dest", &dst], 3);
    let conn_ids: BTreeSet<u64> = events
        .iter()
        .map(|e| e["conn_id"].as_u64().unwrap())
        .collect();
    assert_eq!(conn_ids.len(), 1, "curl reused its connection: {events:#?}");
    let conns = agent.wait_events(&["--kind", "connection", "--dest", &dst], 1);
    assert_eq!(conns.len(), 1, "{conns:#?}");
    assert_eq!(
        server.connections(),
        1,
        "the upstream connection was kept too"
    );
}

#[test]
fn ca_export_prints_the_certificate_the_agent_signs_with_and_never_its_key() {
    require_root();
    let ca = TestCa::new();
    let cg = TestCgroup::new("ca-export");
    let agent = agent_for(&cg, &ca, &[]);
    let out = agent.cli(&["ca", "export"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = String::from_utf8(out.stdout).unwrap();
    assert_eq!(pem, std::fs::read_to_string(agent.ca_pem_path()).unwrap());
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(!pem.contains("PRIVATE KEY"));
    // The key stays private to root.
    let key = agent.state_dir.join("ca").join("guard-ca.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
}

/// Runs curl in `agent`'s exec cgroup with `--proxy` and `proxy` (extra
/// options first, the proxy URL last) and checks that it fails because its
/// CONNECT was answered with `status`.
fn curl_connect_refused(agent: &Agent, proxy: &[&str], url: &str, status: &str) {
    let (url_of_proxy, options) = proxy.split_last().unwrap();
    let out = agent
        .exec("curl")
        .args(["-sS", "--max-time", "20"])
        .args(options)
        .args(["--proxy", url_of_proxy, url])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("CONNECT tunnel failed, response {status}")),
        "{stderr}"
    );
}

/// An AWS access key id (the default policy masks it anywhere but AWS).
const AWS_KEY: &str = "AKIAZ7QK3MXWB4PLR2TD";

/// The site's proxy (on 127.0.0.2 in the test) may receive its credentials.
const PROXY_POLICY: &str = r#"Policy(
    name: "proxy",
    rules: [
        Rule(
            name: "no-tunnels-to-paste-sites",
            when: (host: ["paste.test"]),
            action: Block(reason: "uploads to paste sites are not allowed"),
        ),
        Rule(
            name: "our-proxy",
            when: (method: ["CONNECT"], cidr: ["127.0.0.2/32"]),
            action: Allow,
        ),
    ],
)"#;

#[test]
fn https_through_an_explicit_proxy_is_inspected_inside_its_connect_tunnel() {
    require_root();
    let ca = TestCa::new();
    let server = TlsServer::start(external_v4(0), &ca, CertKind::Valid);
    let port = server.port();
    // The proxy is on 127.0.0.2 too: the monitored clients' connections to
    // it are redirected, the proxy's own to the server are not.
    let proxy = ConnectProxy::start(external_v4(0));
    let proxy_url = format!("http://{}", proxy.addr);
    let cg = TestCgroup::new("https-proxy");
    // The default policy masks credentials leaving home, the proxy's too;
    // a rule of the site's own lets the proxy's through.
    let policies = tempfile::Builder::new()
        .prefix("guard-policy-")
        .tempdir()
        .unwrap();
    std::fs::write(policies.path().join("10-proxy.ron"), PROXY_POLICY).unwrap();
    std::fs::write(
        policies.path().join("50-default.ron"),
        include_str!("../../policies/default.ron"),
    )
    .unwrap();
    let agent = agent_for(
        &cg,
        &ca,
        &["--policy-dir", policies.path().to_str().unwrap()],
    );

    // curl: CONNECT api.test:PORT through the proxy, then TLS inside.
    let out = run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "20",
        "--http1.1",
        "--proxy",
        &proxy_url,
        "--proxy-header",
        "Proxy-Authorization: Basic cHJveHk6c2VjcmV0",
        "-H",
        "X-Test: tunnel",
        &format!("https://api.test:{port}/v1/tunnel?x=1"),
    ]));
    let body = json_of(&out);
    assert_eq!(body["path"], "/v1/tunnel", "{body:#}");
    assert_eq!(body["host"], format!("api.test:{port}"));

    // HTTP/2 inside the tunnel: ALPN negotiated through it, both legs h2.
    let out = run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "20",
        "--http2",
        "--proxy",
        &proxy_url,
        &format!("https://api.test:{port}/v2/tunnel"),
    ]));
    let body = json_of(&out);
    assert_eq!(body["path"], "/v2/tunnel", "{body:#}");
    assert_eq!(body["alpn"], "h2", "{body:#}");

    // The server closes its connection after a response (`Connection:
    // close`): the tunnel ends, and the client's connection with it, as
    // through the proxy alone; curl opens a new one for the next request.
    let out = run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "20",
        "--http1.1",
        "--proxy",
        &proxy_url,
        "-w",
        "\n",
        &format!("https://api.test:{port}/close/first"),
        &format!("https://api.test:{port}/close/second"),
    ]));
    assert_eq!(answered_paths(&out), ["/close/first", "/close/second"]);

    // python3 urllib through HTTPS_PROXY, a secret in the body: the
    // default policy masks it inside the tunnel as anywhere else.
    let py = format!(
        "import urllib.request
req = urllib.request.Request('https://api.test:{port}/py/keys', data=b'key={AWS_KEY}', method='POST')
print(urllib.request.urlopen(req, timeout=20).read().decode())
"
    );
    let out = run_ok(
        agent
            .exec("python3")
            .env("https_proxy", &proxy_url)
            .args(["-c", &py]),
    );
    let body = json_of(&out);
    assert_eq!(body["path"], "/py/keys", "{body:#}");
    let sent = format!("key={AWS_KEY}");
    assert_eq!(body["body_len"], sent.len(), "masking keeps the length");
    assert_ne!(
        body["body_sha256"],
        sha256_hex(sent.as_bytes()),
        "the key reached the server unmasked"
    );

    // A tunnel the policy forbids is never asked of the proxy.
    curl_connect_refused(
        &agent,
        &[&proxy_url],
        &format!("https://paste.test:{port}/new"),
        "403",
    );
    let blocked = agent.wait_events(&["--http", "--verdict", "block"], 1);
    assert_eq!(blocked[0]["http"]["method"], "CONNECT", "{blocked:#?}");
    assert_eq!(blocked[0]["http"]["host"], "paste.test");
    assert_eq!(blocked[0]["policy"]["rule"], "no-tunnels-to-paste-sites");

    // A proxy spoken to over TLS (an https:// proxy URL; the same proxy
    // behind a TLS front): the client's TLS to the proxy is terminated,
    // the CONNECT goes to the proxy inside the agent's own TLS to it, and
    // the tunnel inside that is looked into as any other.
    let tls_proxy = TlsFront::start(external_v4(0), &ca, proxy.addr);
    let tls_proxy_dst = tls_proxy.addr.to_string();
    // curl reads no environment variable for a proxy's CA: the Guard CA is
    // given to it (or installed with `guard-agent ca install`).
    let out = run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "20",
        "--proxy-cacert",
        agent.ca_pem_path().to_str().unwrap(),
        "--proxy",
        &format!("https://{tls_proxy_dst}"),
        "-d",
        &format!("key={AWS_KEY}"),
        &format!("https://api.test:{port}/over-tls-proxy"),
    ]));
    let body = json_of(&out);
    assert_eq!(body["path"], "/over-tls-proxy", "{body:#}");
    let sent = format!("key={AWS_KEY}");
    assert_eq!(body["body_len"], sent.len(), "masking keeps the length");
    assert_ne!(
        body["body_sha256"],
        sha256_hex(sent.as_bytes()),
        "the key reached the server unmasked through the TLS proxy"
    );
    let over_tls = agent.wait_events(&["--http", "--dest", &tls_proxy_dst], 2);
    let connect = over_tls
        .iter()
        .find(|e| e["http"]["method"] == "CONNECT")
        .unwrap_or_else(|| panic!("no CONNECT: {over_tls:#?}"));
    assert_eq!(connect["http"]["scheme"], "https", "{connect:#}");
    assert_eq!(connect["http"]["status"], 200, "{connect:#}");
    assert_eq!(connect["tls"]["sni"], "api.test", "{connect:#}");
    let inner = by_path(&over_tls, "/over-tls-proxy");
    assert_eq!(inner["http"]["host"], "api.test", "{inner:#}");
    assert_eq!(str_field(inner, "verdict"), "mask", "{inner:#}");
    assert_eq!(inner["conn_id"], connect["conn_id"], "{over_tls:#?}");

    // A client that does not trust the Guard CA fails inside the tunnel,
    // and the CONNECT's event says why.
    let out = agent
        .exec("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(ca.pem_path())
        .args([
            "--proxy",
            &proxy_url,
            &format!("https://api.test:{port}/untrusted"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "curl trusted the Guard's leaf");
    let errors = agent.wait_events(&["--http", "--verdict", "error"], 1);
    let untrusted = by_error(&errors, "the client rejected the TLS handshake");
    assert_eq!(untrusted["http"]["method"], "CONNECT", "{untrusted:#}");
    assert_eq!(untrusted["tls"]["sni"], "api.test", "{untrusted:#}");

    // A malformed ClientHello inside a tunnel closes that tunnel, and the
    // CONNECT's event says why.
    let py = format!(
        r#"
import socket
s = socket.create_connection(('127.0.0.2', {proxy_port}), timeout=20)
s.sendall(b'CONNECT api.test:{port} HTTP/1.1\r\nHost: api.test:{port}\r\n\r\n')
head = b''
while not head.endswith(b'\r\n\r\n'):
    head += s.recv(1)
print(head.split(b' ')[1].decode())
s.sendall(b'\x16\x03\x01\x00\x10' + b'\x01\x00\x00\x0c' + b'garbage-garb')
print('closed' if s.recv(4096) == b'' else 'answered')
"#,
        proxy_port = proxy.addr.port()
    );
    let out = run_ok(agent.exec("python3").args(["-c", &py]));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200\nclosed\n");
    let errors = agent.wait_events(&["--http", "--verdict", "error"], 2);
    let malformed = by_error(&errors, "malformed TLS ClientHello");
    assert_eq!(malformed["http"]["method"], "CONNECT", "{malformed:#}");

    // A proxy that authenticates the connection: curl's first CONNECT is
    // answered 407, and its retry with credentials must come on the same
    // connection, which it does through Guard too.
    let out = run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "20",
        "--proxy-anyauth",
        "--proxy-user",
        "proxy:secret",
        "--proxy",
        &proxy_url,
        &format!("https://auth.pinned.test:{port}/after-auth"),
    ]));
    assert_eq!(json_of(&out)["path"], "/after-auth");

    // A far end that speaks first (an SSH-like banner), its first bytes
    // sent with the proxy's answer: they reach the client, and the tunnel
    // carries the rest both ways.
    let banner = std::net::TcpListener::bind(external_v4(0)).unwrap();
    let banner_port = banner.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = banner.accept().unwrap();
        s.write_all(b"SSH-2.0-GuardTest\r\n").unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        s.write_all(&buf[..n]).unwrap();
    });
    let py = format!(
        r#"
import socket
s = socket.create_connection(('127.0.0.2', {proxy_port}), timeout=20)
s.sendall(b'CONNECT ssh.test:{banner_port} HTTP/1.1\r\nHost: ssh.test:{banner_port}\r\n\r\n')
data = b''
while b'\r\n\r\n' not in data or not data.endswith(b'GuardTest\r\n'):
    data += s.recv(4096)
print(data.split(b'\r\n\r\n', 1)[1].decode().strip())
s.sendall(b'ping')
print(s.recv(64).decode())
"#,
        proxy_port = proxy.addr.port()
    );
    let out = run_ok(agent.exec("python3").args(["-c", &py]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "SSH-2.0-GuardTest\nping\n"
    );

    // The proxy saw eight tunnels to api.test, one for each client
    // connection (curl's two for the closing server and the one through
    // the TLS front included), with the client's own headers; the
    // untrusting and the malformed clients' tunnels too.
    let connects: Vec<String> = proxy
        .heads()
        .into_iter()
        .filter(|h| h.starts_with("CONNECT api.test"))
        .collect();
    assert_eq!(connects.len(), 8, "{connects:#?}");
    for head in &connects {
        assert!(
            head.starts_with(&format!("CONNECT api.test:{port} HTTP/1.1\r\n")),
            "{head}"
        );
    }
    assert!(
        connects[0].contains("Basic cHJveHk6c2VjcmV0"),
        "the proxy credentials did not reach the proxy: {}",
        connects[0]
    );
    assert_eq!(server.requests().len(), 7);
    // One proxy connection per client connection, as without Guard (a
    // proxy that authenticates connections needs that): eleven so far.
    assert_eq!(proxy.connections(), 11);
    // Every tunnel reached the server (the proxy connects when it answers
    // the CONNECT), the untrusting and the malformed clients' with no
    // request.
    assert_eq!(server.connections(), 9);

    // Each tunnel: its CONNECT, and the requests inside it, linked by the
    // connection id; all of it attributed to the client.
    let proxy_dst = proxy.addr.to_string();
    let events = agent.wait_events(&["--http", "--dest", &proxy_dst, "--verdict", "allow"], 13);
    let masked = agent.wait_events(&["--http", "--dest", &proxy_dst, "--verdict", "mask"], 1);
    let (others, events): (Vec<Value>, Vec<Value>) = events
        .into_iter()
        .chain(masked)
        .partition(|e| e["http"]["host"] != "api.test");
    let ssh: Vec<&Value> = others
        .iter()
        .filter(|e| e["http"]["host"] == "ssh.test")
        .collect();
    assert_eq!(ssh.len(), 1, "{others:#?}");
    assert_eq!(ssh[0]["http"]["path"], format!("ssh.test:{banner_port}"));
    assert!(
        ssh[0]["tls"].is_null() && ssh[0]["error"].is_null(),
        "{ssh:#?}"
    );
    // The authenticating proxy: a 407, then the tunnel and the request in
    // it, all on one client connection.
    let auth: Vec<&Value> = others
        .iter()
        .filter(|e| e["http"]["host"] == "auth.pinned.test")
        .collect();
    let statuses: Vec<&Value> = auth.iter().map(|e| &e["http"]["status"]).collect();
    assert_eq!(statuses, [407, 200, 200], "{auth:#?}");
    assert!(
        auth.iter().all(|e| e["conn_id"] == auth[0]["conn_id"]),
        "{auth:#?}"
    );
    assert_eq!(events.len(), 10, "{events:#?}");
    let tunnels: Vec<&Value> = events
        .iter()
        .filter(|e| e["http"]["method"] == "CONNECT")
        .collect();
    assert_eq!(tunnels.len(), 5, "{events:#?}");
    assert_ne!(
        by_path(&events, "/close/first")["conn_id"],
        by_path(&events, "/close/second")["conn_id"],
        "the client's connection outlived the tunnel it carried"
    );
    for t in &tunnels {
        assert_eq!(t["http"]["host"], "api.test", "{t:#}");
        assert_eq!(t["http"]["path"], format!("api.test:{port}"), "{t:#}");
        assert_eq!(t["http"]["status"], 200, "{t:#}");
        assert_eq!(t["http"]["scheme"], "http", "{t:#}");
        assert_eq!(str_field(t, "verdict"), "allow");
        assert_eq!(t["policy"]["rule"], "our-proxy", "{t:#}");
        assert!(
            header(&t["http"]["request_headers"], "proxy-authorization")
                .is_none_or(|v| !v.contains("cHJveHk6c2VjcmV0")),
            "a proxy credential reached the store: {t:#}"
        );
    }
    let curl_ev = by_path(&events, "/v1/tunnel");
    assert_eq!(curl_ev["http"]["method"], "GET");
    assert_eq!(curl_ev["http"]["scheme"], "https");
    assert_eq!(curl_ev["http"]["host"], "api.test");
    assert_eq!(curl_ev["http"]["query"], "x=1");
    assert_eq!(curl_ev["http"]["status"], 200);
    assert_eq!(
        header(&curl_ev["http"]["request_headers"], "x-test"),
        Some("tunnel")
    );
    assert_eq!(curl_ev["tls"]["sni"], "api.test");
    assert_eq!(str_field(curl_ev, "host"), "api.test");
    assert_eq!(str_field(curl_ev, "exe"), "/usr/bin/curl");
    let h2_ev = by_path(&events, "/v2/tunnel");
    assert_eq!(h2_ev["http"]["version"], "HTTP/2", "{h2_ev:#}");
    assert_eq!(h2_ev["tls"]["alpn"], "h2");
    assert_eq!(h2_ev["tls"]["upstream_alpn"], "h2");
    let py_ev = by_path(&events, "/py/keys");
    assert!(str_field(py_ev, "exe").contains("python3"), "{py_ev:#}");
    assert_eq!(str_field(py_ev, "verdict"), "mask", "{py_ev:#}");
    assert_eq!(py_ev["policy"]["rule"], "secrets-leaving-home", "{py_ev:#}");
    for inner in [curl_ev, py_ev] {
        assert!(
            tunnels.iter().any(|t| t["conn_id"] == inner["conn_id"]),
            "no CONNECT event on the connection of {inner:#}"
        );
    }
    // Plain HTTP through the proxy: the request goes to it in the form the
    // client wrote, the whole URL.
    let plain = TlsServer::start_plain(external_v4(0));
    let out = run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "20",
        "--proxy",
        &proxy_url,
        &format!("http://plain.test:{}/via-proxy?q=1", plain.port()),
    ]));
    assert_eq!(json_of(&out)["path"], "/via-proxy");
    let line = format!(
        "GET http://plain.test:{}/via-proxy?q=1 HTTP/1.1\r\n",
        plain.port()
    );
    assert!(
        proxy.heads().iter().any(|h| h.starts_with(&line)),
        "{:#?}",
        proxy.heads()
    );
    let plain_ev = agent.wait_events(&["--http", "--dest", &proxy_dst, "--verdict", "allow"], 14);
    let plain_ev = by_path(&plain_ev, "/via-proxy");
    assert_eq!(plain_ev["http"]["host"], "plain.test", "{plain_ev:#}");
    assert_eq!(plain_ev["http"]["scheme"], "http");
    assert_eq!(plain_ev["http"]["query"], "q=1");
    assert_eq!(plain_ev["http"]["status"], 200);

    // `events show` prints the CONNECT as curl -v would.
    let show = agent.cli(&["events", "show", &tunnels[0]["id"].to_string()]);
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.contains(&format!("> CONNECT api.test:{port} HTTP/1.1")),
        "{show}"
    );
    assert!(show.contains("< HTTP/1.1 200"), "{show}");

    // The server inside an authenticated tunnel closes its connection,
    // once saying so and once not (as an idle timeout does): each time the
    // client's connection ends with the tunnel, and curl opens and
    // authenticates a new one, as through the proxy alone. Guard never
    // sends the client's credentials on a connection of its own: this proxy
    // refuses credentials on a connection it has not challenged.
    let connections = proxy.connections();
    let out = run_ok(agent.exec("curl").args([
        "-sS",
        "--max-time",
        "20",
        "--http1.1",
        "--proxy-anyauth",
        "--proxy-user",
        "proxy:secret",
        "--proxy",
        &proxy_url,
        "-w",
        "\n",
        &format!("https://auth.pinned.test:{port}/close/auth"),
        &format!("https://auth.pinned.test:{port}/drop/first"),
        &format!("https://auth.pinned.test:{port}/drop/second"),
    ]));
    assert_eq!(
        answered_paths(&out),
        ["/close/auth", "/drop/first", "/drop/second"]
    );
    assert_eq!(proxy.connections(), connections + 3);
    // The request that found its tunnel closed: recorded on the old
    // connection, the client's retry on a new one.
    let errors = agent.wait_events(&["--http", "--verdict", "error"], 3);
    let closed = by_error(&errors, "the tunnel through the proxy closed");
    assert_eq!(closed["http"]["path"], "/drop/second", "{closed:#}");
    // Three authenticated tunnels (a 407, a 200 and a request each).
    let allowed = agent.wait_events(&["--http", "--dest", &proxy_dst, "--verdict", "allow"], 23);
    let first = by_path(&allowed, "/drop/first");
    let second = by_path(&allowed, "/drop/second");
    assert_eq!(first["conn_id"], closed["conn_id"], "{first:#}");
    assert_ne!(second["conn_id"], closed["conn_id"], "{second:#}");
    assert_eq!(second["http"]["status"], 200, "{second:#}");

    let all = serde_json::to_string(&agent.events(&[])).unwrap();
    assert!(
        !all.contains(AWS_KEY),
        "the store holds the key sent through the tunnel"
    );
}
