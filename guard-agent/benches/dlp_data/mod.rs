//! Test data for the DLP benchmarks (criterion's `dlp` bench and the
//! `dlp_scan` example that `cargo xtask bench` runs): log-like text and a
//! JSON array, clean or with a finding every few hundred bytes. Synthetic
//! values only (a test card number, random tokens), never real credentials.

pub const MIB: usize = 1 << 20;

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

pub fn text(dense: bool) -> Vec<u8> {
    text_of(MIB, dense)
}

/// `len` bytes of log-like text; with `dense`, a finding every other line.
pub fn text_of(len: usize, dense: bool) -> Vec<u8> {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut s = String::new();
    let mut i = 0;
    while s.len() < len {
        s.push_str(&clean_line(&mut rng));
        if dense && i % 2 == 0 {
            s.push_str(&format!("value {}\n", dense_value(&mut rng, i / 2)));
        }
        i += 1;
    }
    s.truncate(len);
    s.into_bytes()
}

pub fn json(dense: bool) -> Vec<u8> {
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

/// `len` bytes of log-like text with a finding on one line in 16 (about
/// one per 1.7 KiB); `seed` varies the content between blocks.
#[allow(dead_code)] // used by the dlp_scan example, not by the criterion bench
pub fn mixed_of(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut s = String::with_capacity(len + 256);
    let mut i = 0;
    while s.len() < len {
        s.push_str(&clean_line(&mut rng));
        if i % 16 == 15 {
            s.push_str(&format!("value {}\n", dense_value(&mut rng, i / 16)));
        }
        i += 1;
    }
    s.truncate(len);
    s.into_bytes()
}
