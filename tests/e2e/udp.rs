//! Other UDP decided by policy, end to end: real kernel programs, a python3
//! client in a monitored cgroup, receivers of the test's own on 127.0.0.5
//! and 127.0.0.2, and a policy file rewritten while the agent runs.
//!
//! Traffic goes to 127.0.0.0/8 only.

use std::{
    net::UdpSocket,
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use guard_harness::{agent_bin, require_root, Agent, AgentOptions, TestCgroup};

fn policy(block_port: Option<u16>) -> String {
    let rule = match block_port {
        Some(port) => format!(
            r#"Rule(
            name: "no-udp-to-5",
            when: (protocol: [Udp], cidr: ["127.0.0.5"], port: [{port}]),
            action: Block(reason: "test: UDP to 127.0.0.5"),
        ),"#
        ),
        None => String::new(),
    };
    format!(
        r#"Policy(
    name: "udp-test",
    mode: Enforce,
    default: Allow,
    rules: [
        {rule}
        Rule(name: "tcp-is-fine", when: (protocol: [Tcp]), action: Allow),
    ],
)"#
    )
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Two receivers on 127.0.0.5, on ports N and N + 1.
fn adjacent_receivers() -> (UdpSocket, UdpSocket, u16) {
    loop {
        let a = UdpSocket::bind("127.0.0.5:0").expect("bind 127.0.0.5/udp");
        let n = a.local_addr().unwrap().port();
        if n == u16::MAX {
            continue;
        }
        if let Ok(b) = UdpSocket::bind(("127.0.0.5", n + 1)) {
            return (a, b, n);
        }
    }
}

fn probe(cg: &TestCgroup, targets: &[String]) -> String {
    let out = cg
        .command("python3")
        .args(["-c", guard_harness::PY_UDP_PROBE])
        .args(targets)
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    t
}

fn receive(sock: &UdpSocket, what: &str) {
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = sock
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("{what}: nothing arrived: {e}"));
    assert_eq!(&buf[..n], b"probe", "{what}");
}

fn nothing_waiting(sock: &UdpSocket, what: &str) {
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    let got = sock.recv_from(&mut buf);
    sock.set_nonblocking(false).unwrap();
    assert!(got.is_err(), "{what}: a refused datagram arrived");
}

#[test]
fn a_policy_rule_refuses_udp_to_one_port_until_the_policy_file_is_rewritten() {
    require_root();
    let (blocked_rx, next_rx, n) = adjacent_receivers();
    let pol = tempfile::Builder::new()
        .prefix("guard-udp-policy-")
        .tempdir()
        .unwrap();
    let file = pol.path().join("udp.ron");
    std::fs::write(&file, policy(Some(n))).unwrap();
    let cg = TestCgroup::new("udp-policy");
    let agent = Agent::start(AgentOptions {
        cgroups: vec![cg.path.clone()],
        extra_args: vec!["--policy-dir".into(), pol.path().display().to_string()],
        ..Default::default()
    });
    let blocked = format!("127.0.0.5:{n}");
    let next = format!("127.0.0.5:{}", n + 1);

    let t = probe(
        &cg,
        &[blocked.clone(), next.clone(), "127.0.0.2:443".into()],
    );
    assert!(
        t.contains(&format!("{blocked} sendto=EPERM connect=EPERM")),
        "{t}"
    );
    assert!(t.contains(&format!("{next} sendto=ok connect=ok")), "{t}");
    assert!(
        t.contains("127.0.0.2:443 sendto=EPERM connect=EPERM"),
        "the default QUIC block stays: {t}"
    );
    receive(&next_rx, "port N+1 (sendto)");
    receive(&next_rx, "port N+1 (connect)");
    nothing_waiting(&blocked_rx, "port N");

    // Rewrite the policy without the rule; the agent notices the file change.
    std::fs::write(&file, policy(None)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let t = loop {
        let t = probe(&cg, std::slice::from_ref(&blocked));
        if t.contains(&format!("{blocked} sendto=ok connect=ok")) {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "still refused after the policy was rewritten: {t}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(t.contains("sendto=ok"), "{t}");
    receive(&blocked_rx, "port N after the reload (sendto)");
    receive(&blocked_rx, "port N after the reload (connect)");

    let t = probe(&cg, &["127.0.0.2:443".into()]);
    assert!(
        t.contains("127.0.0.2:443 sendto=EPERM connect=EPERM"),
        "the default QUIC block survives the reload: {t}"
    );
    let reloads = agent.wait_events(&["--kind", "policy_reload"], 1);
    assert!(
        reloads.iter().any(|e| e["verdict"] != "error"),
        "{reloads:#?}"
    );
}

fn policy_check(dir: &Path) -> Output {
    Command::new(agent_bin())
        .args(["policy", "check"])
        .arg(dir)
        .output()
        .unwrap()
}

#[test]
fn policy_check_rejects_a_udp_rule_on_a_host_name_naming_file_line_and_rule() {
    let pol = tempfile::Builder::new()
        .prefix("guard-udp-check-")
        .tempdir()
        .unwrap();
    std::fs::write(
        pol.path().join("udp.ron"),
        r#"Policy(name: "t", mode: Enforce, default: Allow, rules: [
    Rule(name: "quic-to-google", when: (protocol: [Udp], host: ["*.google.com"], port: [443]), action: Allow),
])"#,
    )
    .unwrap();
    let out = policy_check(pol.path());
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    let file = pol.path().join("udp.ron");
    assert!(t.contains(&format!("{}:2:", file.display())), "{t}");
    assert!(
        t.contains("rule `quic-to-google` lists protocol Udp but also `host`"),
        "{t}"
    );

    std::fs::write(pol.path().join("udp.ron"), policy(Some(5353))).unwrap();
    let out = policy_check(pol.path());
    assert!(out.status.success(), "{}", text(&out));
}
