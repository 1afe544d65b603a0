//! DLP throughput: 1 MiB of JSON and of text, with no findings and with a
//! finding every few hundred bytes, through the default detector set; and
//! the naive baseline (every detector's regex run alone, one after another)
//! on the same text, for the ratio.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use guard_agent::dlp::{DlpSettings, Engine, MaskKey};

mod dlp_data;
use dlp_data::{json, text};

fn bench(c: &mut Criterion) {
    // The agent's allocator settings, so the figures are the agent's.
    guard_agent::allocator::tune_for_body_buffers();
    let engine = Engine::compile(&DlpSettings::default(), MaskKey::new([9; 32]))
        .expect("default settings compile");
    let inputs = [
        ("text/clean", text(false)),
        ("text/dense", text(true)),
        ("json/clean", json(false)),
        ("json/dense", json(true)),
    ];
    for (name, data) in &inputs {
        let n = if name.starts_with("json") {
            engine
                .inspect_body(Some("application/json"), None, data)
                .unwrap()
                .findings
                .len()
        } else {
            engine.scan_text(data).findings.len()
        };
        let dense = name.ends_with("dense");
        assert_eq!(n == 0, !dense, "{name}: {n} findings");
        eprintln!("{name}: {} bytes, {n} findings", data.len());
    }
    let mut g = c.benchmark_group("dlp");
    for (name, data) in &inputs {
        g.throughput(Throughput::Bytes(data.len() as u64));
        if name.starts_with("json") {
            g.bench_function(*name, |b| {
                b.iter(|| {
                    engine
                        .inspect_body(Some("application/json"), None, black_box(data))
                        .unwrap()
                })
            });
        } else {
            g.bench_function(*name, |b| b.iter(|| engine.scan_text(black_box(data))));
            let naive = format!("naive-{name}");
            g.bench_function(naive.as_str(), |b| {
                b.iter(|| engine.naive_scan(black_box(data)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
