//! DNS and UDP, end to end: real kernel programs, real clients (dig,
//! python3's resolver and raw sockets) in a monitored cgroup, the agent's
//! resolver forwarding to a fake upstream on 127.0.0.3 (its only upstream),
//! policies from a directory, and the real store read back.
//!
//! Clients ask 127.0.0.4:53, where nothing listens: the kernel sends their
//! queries to the agent. Should a redirect fail, the query goes nowhere
//! beyond loopback.

use std::{
    net::{Ipv4Addr, UdpSocket},
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use guard_harness::{
    dns_server::FakeDns, require_root, servers::EchoServer, Agent, AgentOptions, TestCgroup,
};
use serde_json::Value;

/// The address clients believe is their resolver.
const CLIENT_RESOLVER: &str = "127.0.0.4";
const UPSTREAM_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// A 56-character base32 label: what data smuggled in names looks like.
const TUNNEL_LABEL: &str = "mfrggzdfmztwq2lknnwg23tpobyxe43uov3ho6dzpjqwezlpmz2hg5dq";

const POLICY: &str = r#"Policy(
    name: "dns-test",
    mode: Enforce,
    default: Allow,
    rules: [
        Rule(
            name: "no-evil-names",
            when: (host: ["*.evil.guard-test.example"], protocol: [Dns]),
            action: Block(reason: "test: evil names"),
        ),
        Rule(
            name: "no-blocked-db",
            when: (host: ["blocked-db.guard-test.example"], protocol: [Tcp]),
            action: Block(reason: "test: blocked database"),
        ),
    ],
)"#;

fn policy_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("guard-dns-policy-")
        .tempdir()
        .unwrap();
    std::fs::write(d.path().join("dns.ron"), POLICY).unwrap();
    d
}

fn agent_with(cg: &TestCgroup, upstream: &FakeDns, policy: &Path, intercept: &[&str]) -> Agent {
    Agent::start(AgentOptions {
        cgroups: vec![cg.path.clone()],
        intercept: intercept.iter().map(|s| s.to_string()).collect(),
        extra_args: vec![
            "--policy-dir".into(),
            policy.display().to_string(),
            "--dns-upstream".into(),
            upstream.addr.to_string(),
        ],
        ..Default::default()
    })
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `dig @127.0.0.4 NAME TYPE` in the cgroup.
fn dig(cg: &TestCgroup, name: &str, args: &[&str]) -> Output {
    cg.command("dig")
        .arg(format!("@{CLIENT_RESOLVER}"))
        .args(["+time=5", "+tries=1"])
        .args(args)
        .arg(name)
        .output()
        .expect("dig (bind9-dnsutils) is installed")
}

/// A raw DNS A query from python3: unconnected sendto/recvfrom, prints the
/// reply's source, rcode and first address.
const PY_RAW_QUERY: &str = r#"
import socket, struct, sys
name, dst = sys.argv[1], sys.argv[2]
q = struct.pack('>HHHHHH', 0x4242, 0x0100, 1, 0, 0, 0)
q += b''.join(bytes([len(l)]) + l.encode() for l in name.split('.')) + b'\0'
q += struct.pack('>HH', 1, 1)
s = socket.socket(socket.AF_INET6 if ':' in dst else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.sendto(q, (dst, 53))
data, frm = s.recvfrom(4096)
an = struct.unpack('>H', data[6:8])[0]
ip = socket.inet_ntoa(data[-4:]) if an else '-'
print(f"from={frm[0]}:{frm[1]} id={data[0]:02x}{data[1]:02x} rcode={data[3] & 15} ip={ip}")
"#;

fn dns_events(agent: &Agent, n: usize) -> Vec<Value> {
    agent.wait_events(&["--kind", "dns"], n)
}

fn dns_event<'a>(events: &'a [Value], qname: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["dns"]["qname"].as_str() == Some(qname))
        .unwrap_or_else(|| panic!("no dns event for {qname}: {events:#?}"))
}

#[test]
fn dig_and_python_are_answered_through_the_agent_and_recorded_with_their_process() {
    require_root();
    let upstream = FakeDns::start(
        UPSTREAM_IP,
        &[
            ("dig.guard-test.example", Ipv4Addr::new(127, 0, 0, 21)),
            ("raw.guard-test.example", Ipv4Addr::new(127, 0, 0, 22)),
            ("gai.guard-test.example", Ipv4Addr::new(127, 0, 0, 23)),
            ("tcp.guard-test.example", Ipv4Addr::new(127, 0, 0, 24)),
            ("raw6.guard-test.example", Ipv4Addr::new(127, 0, 0, 27)),
        ],
    );
    let cg = TestCgroup::new("dns-answer");
    let pol = policy_dir();
    // No intercept prefix covers 127.0.0.4: DNS (UDP and TCP) is redirected
    // whatever the scope.
    let agent = agent_with(&cg, &upstream, pol.path(), &["127.0.0.2/32"]);

    // status says the resolver is up, where, and that the fake is its only upstream.
    let st = agent.status();
    assert_eq!(st["resolver"]["up"], true, "{st:#}");
    let listen: Vec<&str> = st["resolver"]["listen"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        listen.contains(&format!("127.0.0.1:{}", agent.port).as_str()),
        "{st:#}"
    );
    assert_eq!(
        st["resolver"]["upstream"],
        serde_json::json!([upstream.addr.to_string()])
    );

    // dig (UDP).
    let out = dig(&cg, "dig.guard-test.example", &["A"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("status: NOERROR"), "{t}");
    assert!(t.contains("127.0.0.21"), "{t}");
    assert!(
        t.contains(&format!("SERVER: {CLIENT_RESOLVER}#53")),
        "dig sees its own resolver: {t}"
    );

    // python raw UDP: the reply appears to come from the resolver it asked.
    let out = cg
        .command("python3")
        .args([
            "-c",
            PY_RAW_QUERY,
            "raw.guard-test.example",
            CLIENT_RESOLVER,
        ])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains(&format!(
            "from={CLIENT_RESOLVER}:53 id=4242 rcode=0 ip=127.0.0.22"
        )),
        "{t}"
    );

    // The same from an IPv6 socket asking ::1.
    let out = cg
        .command("python3")
        .args(["-c", PY_RAW_QUERY, "raw6.guard-test.example", "::1"])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("from=::1:53 id=4242 rcode=0 ip=127.0.0.27"),
        "{t}"
    );

    // A connected UDP socket still sees the resolver it connected to.
    let out = cg
        .command("python3")
        .args(["-c", "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('127.0.0.4', 53)); print('peer', s.getpeername())"])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(t.contains("peer ('127.0.0.4', 53)"), "{t}");

    // python's getaddrinfo (glibc's stub resolver: connected UDP), with a
    // resolv.conf of its own in a private mount namespace.
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_dir.path().join("resolv.conf");
    std::fs::write(
        &conf,
        format!("nameserver {CLIENT_RESOLVER}\noptions timeout:5 attempts:1\n"),
    )
    .unwrap();
    let out = cg
        .command("unshare")
        .args(["--mount", "sh", "-c"])
        .arg(format!(
            "mount --bind {} /etc/resolv.conf && exec python3 -c \"import socket; print(socket.getaddrinfo('gai.guard-test.example', 80, socket.AF_INET)[0][4][0])\"",
            conf.display()
        ))
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("127.0.0.23"), "{t}");

    // dig over TCP goes through the same resolver.
    let out = dig(&cg, "tcp.guard-test.example", &["+tcp", "A"]);
    let t = text(&out);
    assert!(out.status.success() && t.contains("127.0.0.24"), "{t}");

    let events = dns_events(&agent, 5);
    let v4 = format!("{CLIENT_RESOLVER}:53");
    for (name, exe, transport, asked) in [
        ("dig.guard-test.example", "dig", "udp", v4.as_str()),
        ("raw.guard-test.example", "python3", "udp", v4.as_str()),
        ("raw6.guard-test.example", "python3", "udp", "[::1]:53"),
        ("gai.guard-test.example", "python3", "udp", v4.as_str()),
        ("tcp.guard-test.example", "dig", "tcp", v4.as_str()),
    ] {
        let e = dns_event(&events, name);
        assert_eq!(e["kind"], "dns");
        assert_eq!(e["verdict"], "allow", "{e:#}");
        assert_eq!(e["dns"]["transport"], transport, "{e:#}");
        assert_eq!(e["dns"]["qtype"], "A", "{e:#}");
        assert_eq!(e["dns"]["upstream"], upstream.addr.to_string(), "{e:#}");
        assert_eq!(e["dst"], asked, "the resolver the client asked: {e:#}");
        let exe_path = e["exe"].as_str().unwrap_or_default();
        assert!(
            exe_path
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .starts_with(exe),
            "{name}: recorded exe {exe_path}, expected {exe}: {e:#}"
        );
        assert!(e["pid"].as_u64().unwrap_or(0) > 0, "{e:#}");
        let cgroup = e["cgroup"].as_str().unwrap_or_default();
        assert!(cgroup.contains("dns-answer"), "{e:#}");
        let answers = e["dns"]["answers"].as_array().unwrap();
        assert!(!answers.is_empty(), "{e:#}");
    }
    // Every one of them reached the fake upstream: it is the only upstream.
    let asked = upstream.asked();
    for n in ["dig", "raw", "raw6", "gai", "tcp"] {
        assert!(
            asked.contains(&format!("{n}.guard-test.example")),
            "{asked:?}"
        );
    }
}

#[test]
fn a_connection_to_a_resolved_address_is_recorded_and_matched_by_name() {
    require_root();
    let db = EchoServer::start("127.0.0.25:0".parse().unwrap());
    let blocked = EchoServer::start("127.0.0.26:0".parse().unwrap());
    let upstream = FakeDns::start(
        UPSTREAM_IP,
        &[
            ("db.guard-test.example", Ipv4Addr::new(127, 0, 0, 25)),
            (
                "blocked-db.guard-test.example",
                Ipv4Addr::new(127, 0, 0, 26),
            ),
        ],
    );
    let cg = TestCgroup::new("dns-names");
    let pol = policy_dir();
    let agent = agent_with(
        &cg,
        &upstream,
        pol.path(),
        &["127.0.0.25/32", "127.0.0.26/32"],
    );

    // Resolve, then speak raw TCP (no SNI, no Host) to the address.
    let script = r#"
import socket, sys
for name, port in ((sys.argv[1], int(sys.argv[2])), (sys.argv[3], int(sys.argv[4]))):
    q = __import__('struct').pack('>HHHHHH', 7, 0x0100, 1, 0, 0, 0)
    q += b''.join(bytes([len(l)]) + l.encode() for l in name.split('.')) + b'\0' + b'\x00\x01\x00\x01'
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(10)
    u.sendto(q, ('127.0.0.4', 53)); data, _ = u.recvfrom(4096)
    ip = socket.inet_ntoa(data[-4:])
    try:
        c = socket.create_connection((ip, port), timeout=10)
        c.sendall(b'ping\n'); got = c.recv(16)
        print(f"{name} {ip} echo={got!r}")
    except OSError as e:
        print(f"{name} {ip} error={e.__class__.__name__}")
"#;
    let out = cg
        .command("python3")
        .args(["-c", script])
        .args(["db.guard-test.example", &db.addr.port().to_string()])
        .args([
            "blocked-db.guard-test.example",
            &blocked.addr.port().to_string(),
        ])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("db.guard-test.example 127.0.0.25 echo=b'ping\\n'"),
        "{t}"
    );
    assert!(
        t.contains("blocked-db.guard-test.example 127.0.0.26 error="),
        "{t}"
    );

    let conns = agent.wait_events(&["--kind", "connection"], 2);
    let find = |addr: std::net::SocketAddr| {
        conns
            .iter()
            .find(|e| e["dst"].as_str() == Some(addr.to_string().as_str()))
            .unwrap_or_else(|| panic!("no connection to {addr}: {conns:#?}"))
    };
    let ok = find(db.addr);
    assert_eq!(ok["host"], "db.guard-test.example", "{ok:#}");
    assert_eq!(ok["verdict"], "allow", "{ok:#}");
    let refused = find(blocked.addr);
    assert_eq!(
        refused["host"], "blocked-db.guard-test.example",
        "{refused:#}"
    );
    assert_eq!(refused["verdict"], "block", "{refused:#}");
    assert_eq!(refused["policy"]["rule"], "no-blocked-db", "{refused:#}");
}

#[test]
fn a_blocked_name_gets_nxdomain_and_a_tunnelling_name_is_flagged() {
    require_root();
    let upstream = FakeDns::start(UPSTREAM_IP, &[]);
    let cg = TestCgroup::new("dns-policy");
    let pol = policy_dir();
    let agent = agent_with(&cg, &upstream, pol.path(), &[]);

    let out = dig(&cg, "c2.evil.guard-test.example", &["A"]);
    let t = text(&out);
    assert!(t.contains("status: NXDOMAIN"), "{t}");

    let tunnel = format!("{TUNNEL_LABEL}.t.guard-test.example");
    let out = dig(&cg, &tunnel, &["TXT"]);
    let t = text(&out);
    assert!(t.contains("status: NOERROR"), "{t}");

    let events = dns_events(&agent, 2);
    let blocked = dns_event(&events, "c2.evil.guard-test.example");
    assert_eq!(blocked["verdict"], "block", "{blocked:#}");
    assert_eq!(blocked["policy"]["rule"], "no-evil-names", "{blocked:#}");
    assert_eq!(
        blocked["dns"]["rcode"], "Non-Existent Domain",
        "{blocked:#}"
    );
    assert!(blocked["dns"]["upstream"].is_null(), "{blocked:#}");
    assert!(
        !upstream.asked().iter().any(|n| n.contains("evil")),
        "a blocked name never leaves: {:?}",
        upstream.asked()
    );

    let flagged = dns_event(&events, &tunnel);
    assert_eq!(flagged["dns"]["qtype"], "TXT", "{flagged:#}");
    let findings = flagged["findings"].as_array().unwrap();
    let hit = findings
        .iter()
        .find(|f| f["detector"] == "dns-tunnel")
        .unwrap_or_else(|| panic!("not flagged: {flagged:#}"));
    assert_eq!(hit["location"], "query name label", "{hit:#}");
    assert!(
        hit["masked"].as_str().unwrap().contains("56 chars"),
        "{hit:#}"
    );
}

#[test]
fn quic_is_refused_inside_the_scope_and_untouched_outside() {
    require_root();
    let upstream = FakeDns::start(UPSTREAM_IP, &[]);
    let cg = TestCgroup::new("dns-quic");
    let pol = policy_dir();
    let _agent = agent_with(&cg, &upstream, pol.path(), &[]);
    // A receiver on 127.0.0.2:443 shows what actually arrives.
    let rx = UdpSocket::bind("127.0.0.2:443").expect("bind 127.0.0.2:443/udp");
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let other = UdpSocket::bind("127.0.0.2:0").unwrap();
    let other_target = other.local_addr().unwrap().to_string();

    let inside = cg
        .command("python3")
        .args([
            "-c",
            guard_harness::PY_UDP_PROBE,
            "127.0.0.2:443",
            "[::1]:443",
        ])
        .arg(&other_target)
        .output()
        .unwrap();
    let t = text(&inside);
    assert!(inside.status.success(), "{t}");
    assert!(
        t.contains("127.0.0.2:443 sendto=EPERM connect=EPERM"),
        "{t}"
    );
    assert!(t.contains("[::1]:443 sendto=EPERM connect=EPERM"), "{t}");
    assert!(
        t.contains(&format!("{other_target} sendto=ok connect=ok")),
        "other UDP is allowed: {t}"
    );

    // The same probe from a process outside the monitored cgroup.
    let outside = Command::new("python3")
        .args(["-c", guard_harness::PY_UDP_PROBE, "127.0.0.2:443"])
        .output()
        .unwrap();
    let t = text(&outside);
    assert!(t.contains("127.0.0.2:443 sendto=ok connect=ok"), "{t}");
    let mut buf = [0u8; 64];
    let (n, _) = rx
        .recv_from(&mut buf)
        .expect("the outside datagram arrives");
    assert_eq!(&buf[..n], b"probe");
    let mut got = [0u8; 64];
    let (n, _) = other
        .recv_from(&mut got)
        .expect("the inside datagram to another port arrives");
    assert_eq!(&got[..n], b"probe");
}

/// TXT queries from python3, one socket, to `N` names under one domain:
/// `q0.flood.guard-test.example`, … Prints `rcode=…` per answer.
const PY_TXT_FLOOD: &str = r#"
import socket, struct, sys
dst, count = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
for i in range(count):
    name = f"q{i}.flood.guard-test.example"
    q = struct.pack('>HHHHHH', 0x4200 + i, 0x0100, 1, 0, 0, 0)
    q += b''.join(bytes([len(l)]) + l.encode() for l in name.split('.')) + b'\0'
    q += struct.pack('>HH', 16, 1)
    s.sendto(q, (dst, 53))
    data, frm = s.recvfrom(4096)
    print(f"{name} rcode={data[3] & 15}")
"#;

#[test]
fn a_txt_flood_to_one_domain_is_flagged() {
    require_root();
    let upstream = FakeDns::start(UPSTREAM_IP, &[]);
    let cg = TestCgroup::new("dns-txt-flood");
    let pol = policy_dir();
    let config = pol.path().join("agent.ron.conf");
    std::fs::write(&config, "(dns: (tunnel: (max_txt_per_minute: 5)))").unwrap();
    let agent = Agent::start(AgentOptions {
        cgroups: vec![cg.path.clone()],
        extra_args: vec![
            "--config".into(),
            config.display().to_string(),
            "--policy-dir".into(),
            pol.path().display().to_string(),
            "--dns-upstream".into(),
            upstream.addr.to_string(),
        ],
        ..Default::default()
    });
    const QUERIES: usize = 12;
    let out = cg
        .command("python3")
        .args(["-c", PY_TXT_FLOOD, CLIENT_RESOLVER, &QUERIES.to_string()])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert_eq!(t.matches("rcode=0").count(), QUERIES, "{t}");

    let events = dns_events(&agent, QUERIES);
    let txt: Vec<&Value> = events
        .iter()
        .filter(|e| e["dns"]["qtype"] == "TXT")
        .collect();
    assert_eq!(txt.len(), QUERIES, "{events:#?}");
    let flood_finding = |e: &Value| -> Option<Value> {
        e["findings"]
            .as_array()?
            .iter()
            .find(|f| f["detector"] == "dns-tunnel")
            .cloned()
    };
    let flagged: Vec<Value> = txt.iter().filter_map(|e| flood_finding(e)).collect();
    assert!(!flagged.is_empty(), "no TXT flood flagged: {txt:#?}");
    assert!(
        flagged.len() < QUERIES,
        "the first 5 TXT queries are within the limit: {txt:#?}"
    );
    for f in &flagged {
        assert_eq!(
            f["location"], "TXT query rate to guard-test.example",
            "{f:#}"
        );
        assert!(
            f["masked"]
                .as_str()
                .unwrap()
                .contains("TXT queries in a minute"),
            "{f:#}"
        );
    }
    // The queries within the limit are not flagged.
    for i in 0..5 {
        let e = dns_event(&events, &format!("q{i}.flood.guard-test.example"));
        assert!(flood_finding(e).is_none(), "{e:#}");
    }
}
