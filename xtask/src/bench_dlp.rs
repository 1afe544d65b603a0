//! The DLP part of `cargo xtask bench`.
//!
//! 1. **Detector throughput** on one generated file (100 MB; 10 MB with
//!    `--quick`) of log-like text with a finding about every 1.7 KiB, in
//!    the same run: Guard's detector pass and the naive baseline (the same
//!    regexes one after another), both by the release `dlp_scan` example
//!    (`guard-agent/examples/dlp_scan.rs`, CPU time of one core); and
//!    detect-secrets (PyPI), installed into a venv under
//!    `<target>/bench/venv`, `detect-secrets scan FILE` timed (wall, and the
//!    child's CPU time). If pip cannot install it, the report says so.
//! 2. **Masking latency**: 64 KiB `POST`s over one keep-alive connection to
//!    an HTTP server on 127.0.0.2, direct and through Guard (the agent of
//!    the L4 bench, built-in default policy), with a body holding a card
//!    number (masked by the default policy) and with a clean body; p50 per
//!    request. "Added by masking" is Guard-with-card minus Guard-clean.
//!
//! Writes `<out>/dlp.md` and `<out>/dlp.json`. A report, not a test.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Instant,
};

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};

use super::{connect, percentile, Bench};

/// Size of each request body in the latency phase.
pub const BODY: usize = 64 << 10;

/// Builds the `dlp_scan` example (release) and returns its path.
pub fn build_scanner(target: &Path) -> anyhow::Result<PathBuf> {
    crate::run(crate::cargo().args([
        "build",
        "--release",
        "--package",
        "guard-agent",
        "--example",
        "dlp_scan",
    ]))?;
    Ok(target.join("release/examples/dlp_scan"))
}

fn child_cpu_seconds() -> f64 {
    // SAFETY: getrusage with a valid `who` and a zeroed out struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Detector throughput on one file: Guard, naive, detect-secrets.
pub fn throughput(scanner: &Path, out_dir: &Path, quick: bool) -> anyhow::Result<Value> {
    let bytes: usize = if quick { 10_000_000 } else { 100_000_000 };
    let file = out_dir.join("dlp-corpus.txt");
    eprintln!("bench: dlp: generating {} MB ...", bytes / 1_000_000);
    crate::run(
        Command::new(scanner)
            .arg("generate")
            .arg(&file)
            .arg(bytes.to_string()),
    )?;
    eprintln!("bench: dlp: Guard and naive passes ...");
    let out = Command::new(scanner).arg("scan").arg(&file).output()?;
    ensure!(
        out.status.success(),
        "dlp_scan scan failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scan: Value = serde_json::from_slice(&out.stdout).context("dlp_scan output")?;

    let venv = out_dir.join("venv");
    let ds = venv.join("bin/detect-secrets");
    let mut ds_result = json!({"installed": false});
    if !ds.exists() {
        eprintln!(
            "bench: dlp: installing detect-secrets into {} ...",
            venv.display()
        );
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "detect-secrets"])
                .status()
                .is_ok_and(|s| s.success());
        if !ok {
            ds_result = json!({"installed": false, "why": "python3 -m venv / pip install detect-secrets failed"});
        }
    }
    if ds.exists() {
        eprintln!("bench: dlp: detect-secrets scan (slow) ...");
        let version = Command::new(&ds)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let cpu0 = child_cpu_seconds();
        let t0 = Instant::now();
        let o = Command::new(&ds)
            .arg("scan")
            .arg(&file)
            .current_dir(out_dir)
            .output()?;
        let wall = t0.elapsed().as_secs_f64();
        let cpu = child_cpu_seconds() - cpu0;
        let findings = serde_json::from_slice::<Value>(&o.stdout)
            .ok()
            .and_then(|v| {
                v["results"].as_object().map(|r| {
                    r.values()
                        .filter_map(Value::as_array)
                        .map(Vec::len)
                        .sum::<usize>()
                })
            });
        ds_result = json!({
            "installed": true,
            "version": version,
            "ok": o.status.success(),
            "findings": findings,
            "cpu_s": cpu,
            "wall_s": wall,
        });
    }
    let _ = std::fs::remove_file(&file);
    Ok(
        json!({"bytes": bytes, "guard": scan["guard"], "naive": scan["naive"], "detect_secrets": ds_result}),
    )
}

// ------------------------------------------------------------ latency

/// A 64 KiB text body; with `card`, a test card number in the middle.
fn body(card: bool) -> Vec<u8> {
    let line = b"2024-05-12 12:00:00 INFO request handler returned after retrying upstream\n";
    let mut b = Vec::with_capacity(BODY);
    let mut card_due = card;
    while b.len() < BODY {
        if card_due && b.len() >= BODY / 2 {
            b.extend_from_slice(b"payment card 4111 1111 1111 1111 charged\n");
            card_due = false;
        }
        b.extend_from_slice(line);
    }
    b.truncate(BODY);
    b
}

fn read_head(r: &mut BufReader<TcpStream>) -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut l = String::new();
        ensure!(r.read_line(&mut l)? > 0, "connection closed in a header");
        let l = l.trim_end().to_owned();
        if l.is_empty() {
            return Ok(lines);
        }
        lines.push(l);
    }
}

fn header<'a>(head: &'a [String], name: &str) -> Option<&'a str> {
    head.iter().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads a message body by Content-Length or chunked encoding.
fn read_body(r: &mut BufReader<TcpStream>, head: &[String]) -> anyhow::Result<Vec<u8>> {
    if let Some(n) = header(head, "content-length") {
        let mut b = vec![0; n.parse()?];
        r.read_exact(&mut b)?;
        return Ok(b);
    }
    if header(head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut out = Vec::new();
        loop {
            let mut l = String::new();
            r.read_line(&mut l)?;
            let n = usize::from_str_radix(l.trim().split(';').next().unwrap_or(""), 16)?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            out.extend_from_slice(&chunk[..n]);
            if n == 0 {
                return Ok(out);
            }
        }
    }
    Ok(Vec::new())
}

/// HTTP/1.1 server on 127.0.0.2: answers each request with `ok`, keeps the
/// connection; says whether a card number reached it in `X-Saw-Card`.
pub fn http_server() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.2:0").context("bind a server on 127.0.0.2")?;
    let addr = l.local_addr()?;
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let Ok(w) = s.try_clone() else { return };
                let mut w = w;
                let mut r = BufReader::new(s);
                while let Ok(head) = read_head(&mut r) {
                    let Ok(b) = read_body(&mut r, &head) else {
                        return;
                    };
                    let saw = b.windows(4).any(|x| x == b"4111");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Saw-Card: {saw}\r\n\r\nok"
                    );
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// Client side (`bench-client --mode http64k`): `n` POSTs of 64 KiB on one
/// connection after `warmup` untimed ones; `card` picks the body.
pub fn http_client(addr: SocketAddr, n: u64, warmup: u64, card: bool) -> anyhow::Result<Value> {
    let s = connect(addr)?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let body = body(card);
    let mut req = format!(
        "POST /upload HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    let mut us = Vec::with_capacity(n as usize);
    let mut saw_card = 0u64;
    for i in 0..warmup + n {
        let t0 = Instant::now();
        w.write_all(&req)?;
        let head = read_head(&mut r)?;
        let b = read_body(&mut r, &head)?;
        let dt = t0.elapsed();
        ensure!(
            head.first().is_some_and(|l| l.contains(" 200")) && b == b"ok",
            "unexpected answer {head:?}"
        );
        if header(&head, "x-saw-card") == Some("true") {
            saw_card += 1;
        }
        if i >= warmup {
            us.push(dt.as_secs_f64() * 1e6);
        }
    }
    us.sort_by(f64::total_cmp);
    Ok(json!({
        "mode": "http64k",
        "card": card,
        "n": n,
        "connections": 1,
        "saw_card": saw_card,
        "p50_us": percentile(&us, 50.0),
        "p90_us": percentile(&us, 90.0),
        "p99_us": percentile(&us, 99.0),
    }))
}

/// Direct vs Guard, clean and with a card.
pub fn latency(b: &mut Bench, n: u64) -> anyhow::Result<Value> {
    let args = |card: bool| -> Vec<String> {
        let mut a = vec!["--n".into(), n.to_string(), "--warmup".into(), "50".into()];
        if card {
            a.push("--card".into());
        }
        a
    };
    let direct_card = b.client(super::Via::Direct, "http64k", http_server()?, &args(true))?;
    let guard_clean = b.client(super::Via::Guard, "http64k", http_server()?, &args(false))?;
    let guard_card = b.client(super::Via::Guard, "http64k", http_server()?, &args(true))?;
    if guard_card["saw_card"].as_u64() != Some(0) {
        bail!("the card reached the server through Guard: masking did not happen");
    }
    Ok(json!({
        "direct_card": direct_card,
        "guard_clean": guard_clean,
        "guard_card": guard_card,
    }))
}

fn f(v: &Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_f64()
        .unwrap_or(f64::NAN)
}

/// The markdown report.
pub fn markdown(tp: &Value, lat: &Value) -> String {
    let mb = tp["bytes"].as_f64().unwrap_or(0.0) / 1e6;
    let rate = |s: f64| mb / s;
    let mut md = String::from("## DLP\n\n");
    md.push_str(&format!(
        "Detector pass on one {mb:.0} MB file of log-like text with a finding about every 1.7 KiB (same file, same run; MB/s = 10^6 bytes per second of CPU time on one core):\n\n| scanner | findings | CPU s | MB/s (CPU) | wall s |\n|---|---:|---:|---:|---:|\n"
    ));
    for (name, k) in [
        ("Guard (one pass, default set)", "guard"),
        ("naive: same regexes one by one", "naive"),
    ] {
        md.push_str(&format!(
            "| {name} | {} | {:.2} | {:.0} | {:.2} |\n",
            tp[k]["findings"],
            f(tp, &[k, "cpu_s"]),
            rate(f(tp, &[k, "cpu_s"])),
            f(tp, &[k, "wall_s"])
        ));
    }
    let ds = &tp["detect_secrets"];
    if ds["installed"] == true {
        md.push_str(&format!(
            "| detect-secrets {} (`detect-secrets scan FILE`){} | {} | {:.2} | {:.1} | {:.2} |\n",
            ds["version"].as_str().unwrap_or("?"),
            if ds["ok"] == true {
                ""
            } else {
                " — exited with an error"
            },
            ds["findings"],
            f(ds, &["cpu_s"]),
            rate(f(ds, &["cpu_s"])),
            f(ds, &["wall_s"])
        ));
    } else {
        md.push_str(&format!(
            "| detect-secrets | not installed: {} | | | |\n",
            ds["why"].as_str().unwrap_or("pip install failed")
        ));
    }
    md.push_str(
        "\nFindings differ by design: detect-secrets looks for secrets only (not cards, SSNs, emails, IPs) and reports per line.\n\n",
    );
    let p = |k: &str| f(lat, &[k, "p50_us"]);
    md.push_str(&format!(
        "64 KiB `POST` over one keep-alive connection to 127.0.0.2 (p50 per request, µs):\n\n| path | p50 | p90 | p99 |\n|---|---:|---:|---:|\n| direct (card in body) | {:.0} | {:.0} | {:.0} |\n| through Guard, clean body | {:.0} | {:.0} | {:.0} |\n| through Guard, card masked | {:.0} | {:.0} | {:.0} |\n\n",
        p("direct_card"), f(lat, &["direct_card", "p90_us"]), f(lat, &["direct_card", "p99_us"]),
        p("guard_clean"), f(lat, &["guard_clean", "p90_us"]), f(lat, &["guard_clean", "p99_us"]),
        p("guard_card"), f(lat, &["guard_card", "p90_us"]), f(lat, &["guard_card", "p99_us"]),
    ));
    let added = (p("guard_card") - p("guard_clean")) / 1000.0;
    md.push_str(&format!(
        "Added by masking (p50, Guard with card − Guard clean): {added:.3} ms — target < 1 ms: {}. Added by Guard with masking vs direct: {:.3} ms.\n",
        if added < 1.0 { "pass" } else { "FAIL" },
        (p("guard_card") - p("direct_card")) / 1000.0
    ));
    md
}
