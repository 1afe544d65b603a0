//! `cargo xtask demo`: the README's main job, end to end on this machine.
//!
//! A fake "external service" listens on 127.0.0.2 (standing in for
//! example.com); the agent monitors a cgroup the demo creates; an
//! "AI-written" Python script runs there through `guard-agent exec`, fetches a
//! profile full of personal data and POSTs it to the service; then the demo
//! prints what the service received and `guard-agent events`. Traffic stays
//! on 127.0.0.0/8.

use std::process::Command;

use anyhow::{ensure, Context};
use guard_harness::{agent_bin, servers::HttpServer, Agent, AgentOptions, TestCgroup};

use crate::{cargo, root, run as run_cmd};

const PROFILE: &str = r#"{"name":"Ada Lovelace","email":"ada@example.com","card":"4111 1111 1111 1111","ssn":"123-45-6789"}"#;

fn step(s: &str) {
    println!("\n\x1b[1m==> {s}\x1b[0m");
}

pub fn run() -> anyhow::Result<()> {
    step("building guard-agent");
    run_cmd(cargo().args(["build", "--quiet", "--package", "guard-agent"]))?;
    std::env::set_var("GUARD_AGENT_BIN", root().join("target/debug/guard-agent"));

    step("starting a fake external service on 127.0.0.2 (stands in for https://example.com)");
    let service = HttpServer::start("127.0.0.2:0".parse()?, PROFILE);
    println!("service at http://{}", service.addr);

    step("starting guard-agent on a monitored cgroup of its own");
    let cg = TestCgroup::new("demo");
    let agent = Agent::start(AgentOptions {
        cgroups: vec![cg.path.clone()],
        exec_cgroup: Some(cg.path.join("exec")),
        intercept: vec!["127.0.0.2/32".into()],
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
        .status()
        .context("running the script")?;
    ensure!(status.success(), "the script failed: {status}");

    step("what the external service received");
    for r in service.requests() {
        println!(
            "{} {}  {}",
            r.method,
            r.path,
            String::from_utf8_lossy(&r.body)
        );
    }

    step("guard-agent events");
    agent.wait_events(&[], 2);
    let out = agent.cli(&["events"]);
    print!("{}", String::from_utf8_lossy(&out.stdout));

    step("guard-agent events --json --limit 1");
    let out = agent.cli(&["events", "--json", "--limit", "1"]);
    print!("{}", String::from_utf8_lossy(&out.stdout));

    step("guard-agent status");
    let out = agent.cli(&["status"]);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}
