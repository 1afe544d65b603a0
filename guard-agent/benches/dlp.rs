//! DLP throughput: 1 MiB of JSON and of text, with no findings and with a
//! finding every few hundred bytes, through the default detector set; and
//! the naive baseline (every detector's regex run alone, one after another)
//! on the same text, for the ratio.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use guard_agent::dlp::{DlpSettings, Engine, MaskKey};

const MIB: usize = 1 << 20;

const WORDS: &[&str] = &[
    "the",
    "request",
    "handler",
    "returned",
    "after",
    "retrying",
    "connection",
    "to",
    "upstream",
    "service",
    "with",
    "status",
    "cache",
    "miss",
    "for",
    "user",
    "profile",
    "build",
    "step",
    "compiled",
    "crate",
    "in",
    "release",
    "mode",
    "warning",
    "unused",
    "variable",
    "deploy",
    "pipeline",
    "finished",
    "ok",
];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn word(&mut self) -> &'static str {
        WORDS[(self.next() % WORDS.len() as u64) as usize]
    }
    fn alnum(&mut self, n: usize) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        (0..n)
            .map(|_| A[(self.next() % 62) as usize] as char)
            .collect()
    }
}

/// A log-like line: timestamp, level, words, a small number.
fn clean_line(rng: &mut Rng) -> String {
    let mut s = format!(
        "2024-05-{:02} 12:{:02}:{:02} INFO ",
        rng.next() % 28 + 1,
        rng.next() % 60,
        rng.next() % 60
    );
    for _ in 0..(8 + rng.next() % 8) {
        s.push_str(rng.word());
        s.push(' ');
    }
    s.push_str(&format!("in {}ms\n", rng.next() % 900));
    s
}

fn dense_value(rng: &mut Rng, i: usize) -> String {
    match i % 6 {
        0 => "4111 1111 1111 1111".to_string(),
        1 => format!("jane.doe{}@acme-corp.io", rng.next() % 1000),
        2 => format!("ghp_{}", rng.alnum(36)),
        3 => "536-22-1234".to_string(),
        4 => format!("AKIA{}", rng.alnum(16).to_uppercase()),
        _ => "10.1.2.3".to_string(),
    }
}

fn text(dense: bool) -> Vec<u8> {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut s = String::new();
    let mut i = 0;
    while s.len() < MIB {
        s.push_str(&clean_line(&mut rng));
        if dense && i % 2 == 0 {
            s.push_str(&format!("value {}\n", dense_value(&mut rng, i / 2)));
        }
        i += 1;
    }
    s.truncate(MIB);
    s.into_bytes()
}

fn json(dense: bool) -> Vec<u8> {
    let mut rng = Rng(0x0fed_cba9_8765_4321);
    let mut s = String::from("[");
    let mut i = 0;
    while s.len() < MIB - 400 {
        if i > 0 {
            s.push(',');
        }
        let note = if dense {
            dense_value(&mut rng, i)
        } else {
            rng.word().to_string()
        };
        let desc = clean_line(&mut rng);
        s.push_str(&format!(
            r#"{{"id":{i},"name":"{} {}","active":true,"score":{}.{},"tags":["{}","{}"],"note":"{}","description":"{}"}}"#,
            rng.word(),
            rng.word(),
            rng.next() % 100,
            rng.next() % 100,
            rng.word(),
            rng.word(),
            note,
            desc.trim_end(),
        ));
        i += 1;
    }
    s.push(']');
    s.into_bytes()
}

fn bench(c: &mut Criterion) {
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
