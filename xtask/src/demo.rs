//! `cargo xtask demo`: the README's main job, end to end on this machine.
//!
//! A fake "external service" listens on 127.0.0.2 (standing in for
//! example.com) and a fake paste site on 127.0.0.3; the agent monitors a
//! cgroup the demo creates, with the default policy plus one rule that
//! blocks uploads to paste sites (`xtask/demo/policies/`). An "AI-written"
//! Python script runs there through `guard-agent exec`: it fetches a profile
//! full of personal data and POSTs it to the service (the card number and
//! SSN arrive masked), then tries to paste an AWS key (blocked with a 403).
//! The demo prints what each service received and `guard-agent events`.
//! Traffic stays on 127.0.0.0/8.

use std::process::Command;

use anyhow::{ensure, Context};
use guard_harness::{agent_bin, servers::HttpServer, Agent, AgentOptions, TestCgroup};

use crate::{cargo, root, run as run_cmd};

const PROFILE: &str = r#"{"name":"Ada Lovelace","email":"ada@example.com","card":"4111 1111 1111 1111","ssn":"536-22-8147"}"#;

fn step(s: &str) {
    println!("\n\x1b[1m==> {s}\x1b[0m");
}

pub fn run() -> anyhow::Result<()> {
    step("building guard-agent");
    run_cmd(cargo().args(["build", "--quiet", "--package", "guard-agent"]))?;
    std::env::set_var("GUARD_AGENT_BIN", root().join("target/debug/guard-agent"));

    step("starting a fake external service on 127.0.0.2 and a fake paste site on 127.0.0.3");
    let service = HttpServer::start("127.0.0.2:0".parse()?, PROFILE);
    let paste = HttpServer::start("127.0.0.3:0".parse()?, "{\"pasted\":true}");
    println!(
        "service at http://{}, paste site at http://{}",
        service.addr, paste.addr
    );

    step("starting guard-agent on a monitored cgroup of its own");
    let cg = TestCgroup::new("demo");
    let agent = Agent::start(AgentOptions {
        cgroups: vec![cg.path.clone()],
        exec_cgroup: Some(cg.path.join("exec")),
        intercept: vec!["127.0.0.2/32".into(), "127.0.0.3/32".into()],
        extra_args: vec![
            "--policy-dir".into(),
            root().join("xtask/demo/policies").display().to_string(),
        ],
        ..Default::default()
    });
    println!(
        "agent pid {}, state in {}",
        agent.pid(),
        agent.state_dir.display()
    );

    step("running an AI-written sync script under `guard-agent exec`");
    let script = root().join("xtask/demo/ai_written_sync.py");
    let status = Command::new(agent_bin())
        .arg("exec")
        .arg("--state-dir")
        .arg(&agent.state_dir)
        .arg("--")
        .arg("python3")
        .arg(&script)
        .arg(format!("http://{}", service.addr))
        .arg(format!("http://{}", paste.addr))
        .status()
        .context("running the script")?;
    ensure!(status.success(), "the script failed: {status}");

    step("what the external service received (card and SSN masked by Guard)");
    let received = service.requests();
    for r in &received {
        println!(
            "{} {}  {}",
            r.method,
            r.path,
            String::from_utf8_lossy(&r.body)
        );
    }
    let ingest = received
        .iter()
        .find(|r| r.path == "/ingest")
        .context("no /ingest request arrived")?;
    let body = String::from_utf8_lossy(&ingest.body);
    ensure!(
        !body.contains("4111 1111 1111 1111") && !body.contains("536-22-8147"),
        "not masked: {body}"
    );

    step("what the paste site received (nothing: the upload was blocked)");
    println!("{} requests", paste.requests().len());
    ensure!(paste.requests().is_empty(), "the paste site got a request");

    step("guard-agent events");
    agent.wait_events(&["--http"], 3);
    let out = agent.cli(&["events"]);
    print!("{}", String::from_utf8_lossy(&out.stdout));

    step("guard-agent events --verdict mask --json (findings carry masked values only)");
    let out = agent.cli(&["events", "--verdict", "mask", "--json"]);
    print!("{}", String::from_utf8_lossy(&out.stdout));

    step("guard-agent events --verdict block --json");
    let out = agent.cli(&["events", "--verdict", "block", "--json"]);
    print!("{}", String::from_utf8_lossy(&out.stdout));

    step("guard-agent status");
    let out = agent.cli(&["status"]);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}
