//! Heuristics for DNS tunnelling: data smuggled out in query names (long,
//! high-entropy labels), or a channel kept open by many queries (unusual
//! query rates, TXT floods) to one domain.
//!
//! They flag, they do not decide: each hit becomes a `dns-tunnel` finding on
//! the DNS event, and policy may act on it (`findings: ["dns-tunnel"]`). The
//! rate counters are bounded (LRU over domains) and per fixed one-minute
//! window. Nothing here keeps query names beyond the registered domain.

use std::{
    num::NonZeroUsize,
    sync::Mutex,
    time::{Duration, Instant},
};

use lru::LruCache;

use super::settings::TunnelLimits;

/// The finding's detector name, usable in policy `findings`.
pub const DETECTOR: &str = "dns-tunnel";

/// Domains whose rates are tracked at once.
const TRACKED_DOMAINS: usize = 4096;
const WINDOW: Duration = Duration::from_secs(60);

/// One reason a query looks like tunnelling.
#[derive(Debug, Clone, PartialEq)]
pub enum TunnelSign {
    /// A label of `len` characters at `entropy` bits per character.
    LongLabel { len: usize, entropy: f64 },
    /// More than the allowed queries to `domain` in a minute.
    QueryRate { domain: String, count: u32 },
    /// More than the allowed TXT queries to `domain` in a minute.
    TxtFlood { domain: String, count: u32 },
}

impl TunnelSign {
    /// Where, in a finding's words.
    pub fn location(&self) -> String {
        match self {
            TunnelSign::LongLabel { .. } => "query name label".into(),
            TunnelSign::QueryRate { domain, .. } => format!("query rate to {domain}"),
            TunnelSign::TxtFlood { domain, .. } => format!("TXT query rate to {domain}"),
        }
    }

    /// What was seen, without the label itself.
    pub fn summary(&self) -> String {
        match self {
            TunnelSign::LongLabel { len, entropy } => {
                format!("[label of {len} chars, {entropy:.1} bits/char]")
            }
            TunnelSign::QueryRate { count, .. } => format!("[{count} queries in a minute]"),
            TunnelSign::TxtFlood { count, .. } => format!("[{count} TXT queries in a minute]"),
        }
    }
}

/// Shannon entropy of a string, in bits per character.
pub fn entropy(s: &str) -> f64 {
    let mut counts = [0u32; 256];
    let bytes = s.as_bytes();
    for b in bytes {
        counts[usize::from(b.to_ascii_lowercase())] += 1;
    }
    let n = bytes.len() as f64;
    counts
        .iter()
        .filter(|c| **c > 0)
        .map(|c| {
            let p = f64::from(*c) / n;
            -p * p.log2()
        })
        .sum()
}

/// The longest label of `qname` if it is long and random-looking enough.
pub fn long_label(qname: &str, limits: &TunnelLimits) -> Option<TunnelSign> {
    qname
        .trim_end_matches('.')
        .split('.')
        .filter(|l| l.len() >= limits.max_label_len)
        .map(|l| (l.len(), entropy(l)))
        .filter(|(_, e)| *e >= limits.min_label_entropy)
        .max_by_key(|(len, _)| *len)
        .map(|(len, entropy)| TunnelSign::LongLabel { len, entropy })
}

/// The domain rates are counted against: the last two labels
/// (`a.b.example.com` → `example.com`).
pub fn registered_domain(qname: &str) -> String {
    let labels: Vec<&str> = qname
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
        .collect();
    let start = labels.len().saturating_sub(2);
    labels[start..].join(".").to_ascii_lowercase()
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    queries: u32,
    txt: u32,
}

/// Query and TXT counters per domain.
pub struct RateTracker {
    windows: Mutex<LruCache<String, Window>>,
}

impl Default for RateTracker {
    fn default() -> Self {
        Self {
            windows: Mutex::new(LruCache::new(
                NonZeroUsize::new(TRACKED_DOMAINS).expect("non-zero"),
            )),
        }
    }
}

impl RateTracker {
    /// Counts one query and returns the rate signs it triggers.
    pub fn observe(
        &self,
        qname: &str,
        is_txt: bool,
        limits: &TunnelLimits,
        now: Instant,
    ) -> Vec<TunnelSign> {
        let domain = registered_domain(qname);
        let mut map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let w = map.get_or_insert_mut(domain.clone(), || Window {
            started: now,
            queries: 0,
            txt: 0,
        });
        if now.duration_since(w.started) >= WINDOW {
            *w = Window {
                started: now,
                queries: 0,
                txt: 0,
            };
        }
        w.queries += 1;
        w.txt += u32::from(is_txt);
        let mut signs = Vec::new();
        if w.queries > limits.max_queries_per_minute {
            signs.push(TunnelSign::QueryRate {
                domain: domain.clone(),
                count: w.queries,
            });
        }
        if is_txt && w.txt > limits.max_txt_per_minute {
            signs.push(TunnelSign::TxtFlood {
                domain,
                count: w.txt,
            });
        }
        signs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> TunnelLimits {
        TunnelLimits {
            max_label_len: 40,
            min_label_entropy: 3.5,
            max_queries_per_minute: 5,
            max_txt_per_minute: 2,
        }
    }

    #[test]
    fn a_base32_chunk_in_a_label_is_flagged() {
        let q = "mfrggzdfmztwq2lknnwg23tpobyxe43uov3ho6dzpjqwezlpmz2hg5dq.t.exfil.example.";
        match long_label(q, &limits()) {
            Some(TunnelSign::LongLabel { len, entropy }) => {
                assert_eq!(len, 56);
                assert!(entropy > 4.0, "{entropy}");
            }
            other => panic!("not flagged: {other:?}"),
        }
    }

    #[test]
    fn ordinary_and_long_but_repetitive_names_are_not_flagged() {
        assert!(long_label("www.example.com.", &limits()).is_none());
        assert!(long_label("short-but-random-x7q9z.example.com", &limits()).is_none());
        let repetitive = format!("{}.example.com", "a".repeat(60));
        assert!(long_label(&repetitive, &limits()).is_none());
    }

    #[test]
    fn entropy_of_known_strings() {
        assert_eq!(entropy("aaaa"), 0.0);
        assert!((entropy("abcd") - 2.0).abs() < 1e-9);
        assert!((entropy("ABab") - 1.0).abs() < 1e-9, "case-insensitive");
    }

    #[test]
    fn rates_are_counted_per_registered_domain_and_window() {
        let t = RateTracker::default();
        let now = Instant::now();
        for i in 0..5 {
            assert!(t
                .observe(&format!("h{i}.tun.example.com"), false, &limits(), now)
                .is_empty());
        }
        let signs = t.observe("h5.tun.example.com", false, &limits(), now);
        assert_eq!(
            signs,
            vec![TunnelSign::QueryRate {
                domain: "example.com".into(),
                count: 6
            }]
        );
        // Another domain has its own counter; a new window starts afresh.
        assert!(t.observe("www.other.org", false, &limits(), now).is_empty());
        assert!(t
            .observe("h6.example.com", false, &limits(), now + WINDOW)
            .is_empty());
    }

    #[test]
    fn a_txt_flood_is_flagged() {
        let t = RateTracker::default();
        let now = Instant::now();
        assert!(t
            .observe("a.flood.example", true, &limits(), now)
            .is_empty());
        assert!(t
            .observe("b.flood.example", true, &limits(), now)
            .is_empty());
        let signs = t.observe("c.flood.example", true, &limits(), now);
        assert!(
            matches!(&signs[..], [TunnelSign::TxtFlood { count: 3, .. }]),
            "{signs:?}"
        );
    }

    #[test]
    fn registered_domain_takes_the_last_two_labels() {
        assert_eq!(registered_domain("A.B.Example.COM."), "example.com");
        assert_eq!(registered_domain("localhost"), "localhost");
    }
}
