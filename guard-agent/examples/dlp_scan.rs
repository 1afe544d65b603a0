//! DLP throughput on files, in CPU time, for `cargo xtask bench` (and for
//! profiling by hand). Not part of the agent.
//!
//! - `dlp_scan generate FILE BYTES`: writes BYTES of log-like text with a
//!   finding (card, email, GitHub token, SSN, AWS key id, private IP) about
//!   every 200 bytes on one line in 16, i.e. mostly clean text with regular
//!   findings.
//! - `dlp_scan scan FILE`: Guard's detector pass (the default detector set,
//!   one `scan_text` over the whole file) and the naive baseline (every
//!   detector's regex run over the whole file one after another, validators
//!   on each match); prints one JSON line with bytes, findings, CPU seconds
//!   and wall seconds of each.
//! - `dlp_scan inputs [ITERS [NAME]]`: the criterion bench's four 1 MiB inputs,
//!   CPU-time MiB/s of each (steadier than wall time on a busy machine).
//!
//! CPU time is this thread's (`CLOCK_THREAD_CPUTIME_ID`): what one core
//! spends, whatever else the machine is doing.

#[path = "../benches/dlp_data/mod.rs"]
mod dlp_data;

use std::time::Instant;

use guard_agent::dlp::{DlpSettings, Engine, MaskKey};

fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Runs `f` and returns (its result, CPU seconds, wall seconds).
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let (c, w) = (cpu_seconds(), Instant::now());
    let out = f();
    (out, cpu_seconds() - c, w.elapsed().as_secs_f64())
}

/// A named input: its generator and whether it is JSON.
type Input = (&'static str, fn() -> Vec<u8>, bool);

fn engine() -> Engine {
    Engine::compile(&DlpSettings::default(), MaskKey::new([9; 32])).expect("default settings")
}

fn main() {
    // The agent's allocator settings, so the figures are the agent's.
    guard_agent::allocator::tune_for_body_buffers();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("generate") if args.len() == 3 => {
            let bytes: usize = args[2].parse().expect("BYTES is a number");
            // One dense line in 16: about one finding per 3 KiB... plus the
            // dense lines' own; see the module doc.
            let mut out = Vec::with_capacity(bytes);
            let block = 16 * dlp_data::MIB;
            let mut i = 0u64;
            while out.len() < bytes {
                let n = block.min(bytes - out.len());
                out.extend(dlp_data::mixed_of(n, i));
                i += 1;
            }
            std::fs::write(&args[1], &out).expect("write FILE");
        }
        Some("scan") if args.len() == 2 => {
            let data = std::fs::read(&args[1]).expect("read FILE");
            let e = engine();
            let (n, cpu, wall) = timed(|| e.scan_text(&data).findings.len());
            let (naive, ncpu, nwall) = timed(|| e.naive_scan(&data));
            println!(
                "{{\"bytes\":{},\"guard\":{{\"findings\":{n},\"cpu_s\":{cpu:.4},\"wall_s\":{wall:.4}}},\"naive\":{{\"findings\":{naive},\"cpu_s\":{ncpu:.4},\"wall_s\":{nwall:.4}}}}}",
                data.len()
            );
        }
        Some("inputs") => {
            let iters: usize = args.get(1).map_or(20, |s| s.parse().expect("ITERS"));
            let e = engine();
            let inputs: [Input; 4] = [
                ("text/clean", || dlp_data::text(false), false),
                ("text/dense", || dlp_data::text(true), false),
                ("json/clean", || dlp_data::json(false), true),
                ("json/dense", || dlp_data::json(true), true),
            ];
            for (name, make, json) in inputs {
                if args.get(2).is_some_and(|only| only != name) {
                    continue;
                }
                let data = make();
                let run = || {
                    if json {
                        e.inspect_body(Some("application/json"), None, &data)
                            .expect("json")
                            .findings
                            .len()
                    } else {
                        e.scan_text(&data).findings.len()
                    }
                };
                let n = run();
                let ((), cpu, _) = timed(|| {
                    for _ in 0..iters {
                        std::hint::black_box(run());
                    }
                });
                let mib = (data.len() * iters) as f64 / dlp_data::MIB as f64;
                println!(
                    "{name:<11} {:>8.1} MiB/s (CPU time), {n} findings",
                    mib / cpu
                );
            }
        }
        _ => {
            eprintln!("usage: dlp_scan generate FILE BYTES | scan FILE | inputs [ITERS [NAME]]");
            std::process::exit(2);
        }
    }
}
