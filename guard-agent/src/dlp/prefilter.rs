//! Where to look: finds the few places in the data where a built-in
//! detector could match, so that regexes run only there and the clean case
//! costs a couple of vectorised passes over the bytes.
//!
//! Three kinds of candidate:
//! - literal anchors of three bytes or more (`ghp_`, `AKIA`, `-----BEGIN`,
//!   `10.`), all in one case-sensitive Aho-Corasick automaton whose
//!   SIMD (Teddy) prefilter skips clean text;
//! - key words of the case-insensitive detectors (`password`, `token`,
//!   `Bearer`): their first three bytes in lower, Capitalised and UPPER
//!   case join the same automaton, and the whole word is then compared
//!   ignoring case (so `apiKey`, `ClientSecret`, `API_KEY` are found; a
//!   word whose first three letters mix cases, like `pASSword`, is not);
//! - one- and two-byte anchors (`@`, `SK`, `Q~`) each with a memchr/memmem
//!   pass.
//!
//! The anchorless shapes (cards, IBANs, SSNs, phones) start at a digit:
//! [`digit_clusters`] groups digit runs joined by one or two of ` .-()`
//! and keeps only clusters whose run lengths fit one of those shapes.
//!
//! What it must never do: decide a finding. Everything here is a necessary
//! condition; the detector's regex and validator decide.

use std::ops::Range;

use aho_corasick::{packed, AhoCorasick, AhoCorasickKind, MatchKind, Span};
use memchr::memmem;

/// What to do with an anchor found at a position.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    /// Run detector `det`'s regex around the anchor (see `Anchor`).
    Confirm {
        det: usize,
        back: usize,
        span: usize,
    },
    /// The anchor is the first bytes of a case-insensitive key word:
    /// compare the whole (lower-case) word first.
    Word {
        word: Box<[u8]>,
        det: usize,
        back: usize,
        span: usize,
    },
}

/// An anchor's full bytes and what to do when they are found.
type Entry = (Box<[u8]>, Vec<Target>);

/// Anchors of three bytes or more, found by their first three bytes.
struct Group {
    /// SIMD multi-literal search (Teddy) over the distinct prefixes; `None`
    /// where the CPU has no support, then `ac` does it.
    teddy: Option<packed::Searcher>,
    ac: AhoCorasick,
    /// Per prefix (pattern id), the anchors that start with it.
    by_prefix: Vec<Vec<Entry>>,
}

impl Group {
    fn build(list: Vec<(Vec<u8>, Vec<Target>)>) -> Result<Option<Group>, String> {
        if list.is_empty() {
            return Ok(None);
        }
        let mut prefixes: Vec<Vec<u8>> = Vec::new();
        let mut by_prefix: Vec<Vec<Entry>> = Vec::new();
        for (lit, targets) in list {
            let p = lit[..3].to_vec();
            let i = match prefixes.iter().position(|q| *q == p) {
                Some(i) => i,
                None => {
                    prefixes.push(p);
                    by_prefix.push(Vec::new());
                    prefixes.len() - 1
                }
            };
            by_prefix[i].push((lit.into_boxed_slice(), targets));
        }
        let teddy = packed::Config::new()
            .match_kind(packed::MatchKind::LeftmostFirst)
            .builder()
            .extend(&prefixes)
            .build();
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .kind(Some(AhoCorasickKind::DFA))
            .build(&prefixes)
            .map_err(|e| e.to_string())?;
        Ok(Some(Group {
            teddy,
            ac,
            by_prefix,
        }))
    }

    /// Calls `f(target, at)` for each anchor in `hay`.
    fn each(&self, hay: &[u8], mut f: impl FnMut(&Target, usize)) {
        let mut found = |pid: usize, at: usize| {
            for (lit, targets) in &self.by_prefix[pid] {
                // Key words are compared whole by the caller.
                let word = matches!(targets.first(), Some(Target::Word { .. }));
                if word || hay[at..].starts_with(lit) {
                    for t in targets {
                        f(t, at);
                    }
                }
            }
        };
        match &self.teddy {
            Some(teddy) => {
                let mut from = 0;
                while from < hay.len() {
                    let Some(m) = teddy.find_in(hay, Span::from(from..hay.len())) else {
                        break;
                    };
                    found(m.pattern().as_usize(), m.start());
                    // Anchors may overlap (`aws_secret_access_key` holds
                    // `secret`): go on from the next byte.
                    from = m.start() + 1;
                }
            }
            None => {
                for m in self.ac.find_overlapping_iter(hay) {
                    found(m.pattern().as_usize(), m.start());
                }
            }
        }
    }
}

/// How many distinct three-byte prefixes one SIMD pass looks for: Teddy's
/// false candidates grow quickly with more. Measured on the log-text bench
/// (CPU time, default set, 83 prefixes): one pass of all 415 MiB/s, groups
/// of 40: 770, of 16: 960, of 8: 800.
const GROUP_PREFIXES: usize = 16;

/// The same for key words, whose prefixes come in case variants (`tok`,
/// `Tok`, `TOK`): those share Teddy's nibble buckets, so one pass (Fat
/// Teddy above 32 prefixes) holds them all with few false candidates.
/// Measured on the 1 MiB bench inputs (default set, 39 prefixes): three
/// passes of 16 took 159 µs, one pass 93 µs, text or JSON alike. Fat Teddy
/// holds at most 64.
const WORD_GROUP_PREFIXES: usize = 64;

/// Splits anchors into groups with at most `max` distinct prefixes,
/// keeping anchors with the same prefix together.
fn by_prefix_chunks(
    list: Vec<(Vec<u8>, Vec<Target>)>,
    max: usize,
) -> Vec<Vec<(Vec<u8>, Vec<Target>)>> {
    let mut prefixes: Vec<Vec<u8>> = Vec::new();
    let mut chunks: Vec<Vec<(Vec<u8>, Vec<Target>)>> = Vec::new();
    for (lit, t) in list {
        let p = lit[..3].to_vec();
        let i = match prefixes.iter().position(|q| *q == p) {
            Some(i) => i,
            None => {
                prefixes.push(p);
                prefixes.len() - 1
            }
        };
        let c = i / max;
        if chunks.len() <= c {
            chunks.resize_with(c + 1, Vec::new);
        }
        chunks[c].push((lit, t));
    }
    chunks
}

/// Every anchor of the enabled built-in detectors, compiled.
pub(crate) struct Anchors {
    /// Literals in groups of at most [`GROUP_PREFIXES`] distinct prefixes,
    /// then key words in groups of at most [`WORD_GROUP_PREFIXES`]: one
    /// SIMD pass each.
    long: Vec<Group>,
    short: Vec<(memmem::Finder<'static>, Vec<Target>)>,
}

/// Collects anchors while the engine is compiled.
#[derive(Default)]
pub(crate) struct AnchorsBuilder {
    literals: Vec<(Vec<u8>, Vec<Target>)>,
    words: Vec<(Vec<u8>, Vec<Target>)>,
    short: Vec<(Vec<u8>, Vec<Target>)>,
}

fn push(list: &mut Vec<(Vec<u8>, Vec<Target>)>, lit: &[u8], t: Target) {
    match list.iter_mut().find(|(l, _)| l == lit) {
        Some((_, ts)) => ts.push(t),
        None => list.push((lit.to_vec(), vec![t])),
    }
}

impl AnchorsBuilder {
    /// A literal that appears as is (case-sensitive).
    pub fn literal(&mut self, lit: &str, det: usize, back: usize, span: usize) {
        let t = Target::Confirm { det, back, span };
        if lit.len() >= 3 {
            push(&mut self.literals, lit.as_bytes(), t);
        } else {
            push(&mut self.short, lit.as_bytes(), t);
        }
    }

    /// A key word that may appear in any case.
    pub fn word(&mut self, word: &str, det: usize, back: usize, span: usize) {
        let lower = word.to_ascii_lowercase().into_bytes();
        let n = lower.len().min(3);
        let prefix = &lower[..n];
        let mut cap = prefix.to_vec();
        cap[0] = cap[0].to_ascii_uppercase();
        let variants = [prefix.to_vec(), cap, prefix.to_ascii_uppercase()];
        let mut seen: Vec<&[u8]> = Vec::new();
        for v in &variants {
            if seen.contains(&v.as_slice()) {
                continue;
            }
            seen.push(v);
            let t = Target::Word {
                word: lower.clone().into_boxed_slice(),
                det,
                back,
                span,
            };
            // Keyed by the case variant of the prefix: one entry per
            // (variant, word).
            let mut key = v.clone();
            key.extend_from_slice(&lower[n..]);
            if n >= 3 {
                push(&mut self.words, &key, t);
            } else {
                push(&mut self.short, v, t);
            }
        }
    }

    pub fn build(self) -> Result<Anchors, String> {
        let mut long = Vec::new();
        for (list, max) in [
            (self.literals, GROUP_PREFIXES),
            (self.words, WORD_GROUP_PREFIXES),
        ] {
            for chunk in by_prefix_chunks(list, max) {
                long.extend(Group::build(chunk)?);
            }
        }
        Ok(Anchors {
            long,
            short: self
                .short
                .into_iter()
                .map(|(l, t)| (memmem::Finder::new(&l).into_owned(), t))
                .collect(),
        })
    }
}

impl Anchors {
    /// Calls `f(det, at, back, span)` for every anchor in `hay` (key words
    /// already compared whole, ignoring case).
    pub fn each(&self, hay: &[u8], mut f: impl FnMut(usize, usize, usize, usize)) {
        let mut dispatch = |t: &Target, at: usize| match t {
            Target::Confirm { det, back, span } => f(*det, at, *back, *span),
            Target::Word {
                word,
                det,
                back,
                span,
            } => {
                if hay
                    .get(at..at + word.len())
                    .is_some_and(|w| w.eq_ignore_ascii_case(word))
                {
                    f(*det, at, *back, *span)
                }
            }
        };
        for g in &self.long {
            g.each(hay, &mut dispatch);
        }
        for (finder, targets) in &self.short {
            for at in finder.find_iter(hay) {
                for t in targets {
                    dispatch(t, at);
                }
            }
        }
    }
}

/// Finds three-byte ASCII words in any case (`key`, `KEY`, `kEy`), in one
/// SIMD pass: the data is lower-cased a chunk at a time (`| 0x20` maps
/// exactly the upper-case letters onto the lower-case ones, and no other
/// byte onto a letter) and the lower-case words are searched as is.
pub(crate) struct TrigramsAnyCase {
    teddy: Option<packed::Searcher>,
    /// Where the CPU has no SIMD support for Teddy.
    ac: AhoCorasick,
}

/// How many bytes are lower-cased at a time (on the stack).
const FOLD_CHUNK: usize = 4096;

impl TrigramsAnyCase {
    /// `words`: lower-case, three bytes each.
    pub fn new(words: &[&str]) -> Result<Self, String> {
        if words
            .iter()
            .any(|w| w.len() != 3 || w.to_ascii_lowercase() != **w)
        {
            return Err(format!(
                "case-insensitive trigrams must be 3 lower-case bytes: {words:?}"
            ));
        }
        let teddy = packed::Config::new()
            .match_kind(packed::MatchKind::LeftmostFirst)
            .builder()
            .extend(words)
            .build();
        let ac = AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(words)
            .map_err(|e| e.to_string())?;
        Ok(TrigramsAnyCase { teddy, ac })
    }

    /// Calls `f(at)` for each word found in `hay`, in order, until `f`
    /// returns true; returns whether it did.
    pub fn any(&self, hay: &[u8], mut f: impl FnMut(usize) -> bool) -> bool {
        let Some(teddy) = &self.teddy else {
            return self.ac.find_overlapping_iter(hay).any(|m| f(m.start()));
        };
        let mut buf = [0u8; FOLD_CHUNK + 2];
        let mut base = 0;
        while base < hay.len() {
            // Chunks overlap by two bytes, so a word across a boundary is
            // seen whole in the first chunk, and only there.
            let chunk = &hay[base..hay.len().min(base + FOLD_CHUNK + 2)];
            for (d, s) in buf.iter_mut().zip(chunk) {
                *d = s | 0x20;
            }
            let folded = &buf[..chunk.len()];
            let mut from = 0;
            while let Some(m) = teddy.find_in(folded, Span::from(from..folded.len())) {
                if m.start() >= FOLD_CHUNK {
                    break; // starts in the overlap: the next chunk's
                }
                if f(base + m.start()) {
                    return true;
                }
                from = m.start() + 1;
            }
            base += FOLD_CHUNK;
        }
        false
    }
}

/// Where the ASCII digits are, 64 bytes at a time: bit `k` of `mask` is
/// set when `hay[base + k]` is a digit (bits past the end are clear). One
/// SIMD pass per 64 bytes serves every digit run in them.
struct Digits<'a> {
    hay: &'a [u8],
    base: usize,
    mask: u64,
}

impl<'a> Digits<'a> {
    fn new(hay: &'a [u8]) -> Self {
        Digits {
            hay,
            base: 0,
            mask: digit_mask(hay, 0),
        }
    }

    /// The mask from `i` on (bit 0 is `hay[i]`), reloading the window when
    /// `i` is outside it; `None` at the end of `hay`.
    fn from(&mut self, i: usize) -> Option<u64> {
        if i >= self.hay.len() {
            return None;
        }
        if i < self.base || i >= self.base + 64 {
            self.base = i;
            self.mask = digit_mask(self.hay, i);
        }
        Some(self.mask >> (i - self.base))
    }

    /// The first digit at or after `i`.
    fn next(&mut self, mut i: usize) -> Option<usize> {
        loop {
            let m = self.from(i)?;
            if m != 0 {
                return Some(i + m.trailing_zeros() as usize);
            }
            i = self.base + 64;
        }
    }

    /// The end of the digit run at `i` (the first non-digit, or the end).
    fn run_end(&mut self, mut i: usize) -> usize {
        loop {
            let Some(m) = self.from(i) else {
                return self.hay.len();
            };
            let k = (!m).trailing_zeros() as usize;
            if i + k < self.base + 64 {
                return (i + k).min(self.hay.len());
            }
            i = self.base + 64;
        }
    }
}

/// Bit `k` set when `hay[at + k]` is an ASCII digit, for the 64 bytes
/// from `at` (fewer at the end).
#[cfg(target_arch = "x86_64")]
fn digit_mask(hay: &[u8], at: usize) -> u64 {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_set1_epi8,
        _mm_sub_epi8,
    };
    if at + 64 > hay.len() {
        return digit_mask_scalar(hay, at);
    }
    // SAFETY: SSE2 is part of the x86_64 baseline, so these intrinsics are
    // always available; the four loads read 16 bytes each within
    // `at..at + 64`, which `at + 64 <= hay.len()` keeps in bounds
    // (unaligned loads are allowed).
    unsafe {
        let zero = _mm_set1_epi8(b'0' as i8);
        let nine = _mm_set1_epi8(9);
        let digits = |k: usize| {
            let v = _mm_loadu_si128(hay.as_ptr().add(at + 16 * k).cast::<__m128i>());
            let d = _mm_sub_epi8(v, zero);
            u64::from(_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_min_epu8(d, nine), d)) as u16)
        };
        digits(0) | digits(1) << 16 | digits(2) << 32 | digits(3) << 48
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn digit_mask(hay: &[u8], at: usize) -> u64 {
    digit_mask_scalar(hay, at)
}

fn digit_mask_scalar(hay: &[u8], at: usize) -> u64 {
    hay[at..hay.len().min(at + 64)]
        .iter()
        .enumerate()
        .fold(0, |m, (k, b)| m | u64::from(b.is_ascii_digit()) << k)
}

fn is_join(b: u8) -> bool {
    matches!(b, b' ' | b'.' | b'-' | b'(' | b')')
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Whether digit runs (start, end), joined by 1-2 bytes of ` .-()`, have
/// the lengths of a card number, an SSN or a phone number somewhere.
fn runs_fit_a_shape(hay: &[u8], runs: &[(usize, usize)]) -> bool {
    let len = |k: usize| runs.get(k).map(|r| r.1 - r.0);
    let within = |k: usize, lo: usize, hi: usize| len(k).is_some_and(|l| (lo..=hi).contains(&l));
    for i in 0..runs.len() {
        let l0 = runs[i].1 - runs[i].0;
        let zero = hay[runs[i].0] == b'0';
        if (12..=19).contains(&l0) // card, one run
            || (l0 == 4 && len(i + 1) == Some(4) && len(i + 2) == Some(4) && within(i + 3, 1, 4)) // card 4-4-4-n
            || (l0 == 4 && len(i + 1) == Some(6) && within(i + 2, 4, 5)) // card 4-6-5
            || (l0 == 3 && len(i + 1) == Some(2) && len(i + 2) == Some(4)) // SSN
            || (l0 == 3 && len(i + 1) == Some(3) && len(i + 2) == Some(4)) // NANP
            || (zero && (3..=5).contains(&l0) && within(i + 1, 3, 4) && within(i + 2, 3, 4))
            || (zero && l0 == 2 && (1..=4).all(|k| len(i + k) == Some(2)))
        {
            return true;
        }
    }
    false
}

/// Windows of `hay` where a card number, IBAN, SSN or phone number may
/// start and end, in order; each is a cluster of digit runs (with a `+` or
/// `(` before it) or an IBAN's `CCdd` start with room for its BBAN.
/// `runs` is scratch space.
pub(crate) fn digit_clusters(
    hay: &[u8],
    runs: &mut Vec<(usize, usize)>,
    mut f: impl FnMut(Range<usize>),
) {
    let mut digits = Digits::new(hay);
    let mut i = 0;
    while let Some(p) = digits.next(i) {
        runs.clear();
        let mut s = p;
        loop {
            let e = digits.run_end(s);
            runs.push((s, e));
            let mut j = e;
            while j < hay.len() && j - e < 2 && is_join(hay[j]) {
                j += 1;
            }
            if j > e && j < hay.len() && hay[j].is_ascii_digit() {
                s = j;
            } else {
                break;
            }
        }
        let end = runs.last().map_or(p, |r| r.1);
        let before = p.checked_sub(1).map(|k| hay[k]);
        let iban = p >= 2
            && hay[p - 2].is_ascii_uppercase()
            && hay[p - 1].is_ascii_uppercase()
            && (p == 2 || !is_word(hay[p - 3]))
            && runs[0].1 - p >= 2;
        if iban {
            // `CCdd` + up to 30 more, maybe in groups of four.
            f(p - 2..hay.len().min(p + 48).max(end));
        } else if before == Some(b'+') || before == Some(b'(') {
            f(p - 1..end);
        } else if runs_fit_a_shape(hay, runs) {
            f(p..end);
        }
        i = end.max(p + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn windows(s: &str) -> Vec<String> {
        let mut out = Vec::new();
        digit_clusters(s.as_bytes(), &mut Vec::new(), |r| {
            out.push(s[r].to_string())
        });
        out
    }

    #[test]
    fn clusters_keep_shapes_and_skip_timestamps() {
        assert_eq!(
            windows("2024-05-12 12:34:56 INFO in 523ms v1.2.3 10.0.0.1"),
            Vec::<String>::new()
        );
        assert_eq!(
            windows("card 4111 1111 1111 1111 ok"),
            ["4111 1111 1111 1111"]
        );
        assert_eq!(windows("ssn 536-22-1234."), ["536-22-1234"]);
        assert_eq!(windows("call (415) 555-2671"), ["(415) 555-2671"]);
        assert_eq!(windows("tel +44 20 7946 0958"), ["+44 20 7946 0958"]);
        assert_eq!(windows("x 01 23 45 67 89"), ["01 23 45 67 89"]);
        assert_eq!(windows("n 4111111111111111"), ["4111111111111111"]);
        let w = windows("iban GB82 WEST 1234 5698 7654 32 end");
        assert!(w[0].starts_with("GB82 WEST 1234"), "{w:?}");
    }

    #[test]
    fn trigrams_are_found_in_any_case_and_across_chunks() {
        let t = TrigramsAnyCase::new(&["key", "tok"]).unwrap();
        let all = |hay: &[u8]| {
            let mut out = Vec::new();
            t.any(hay, |at| {
                out.push(at);
                false
            });
            out
        };
        assert_eq!(all(b"apiKey x_TOKEN kEy [EY {ey Key"), [3, 9, 15, 27]);
        // `@`, `[` and `_` lower-case to `` ` ``, `{` and DEL: never letters.
        assert!(all(b"@[_ k[y K_Y").is_empty());
        for at in FOLD_CHUNK - 4..FOLD_CHUNK + 4 {
            let mut hay = vec![b'.'; 3 * FOLD_CHUNK];
            hay[at..at + 3].copy_from_slice(b"kEY");
            hay[2 * FOLD_CHUNK + 1..2 * FOLD_CHUNK + 4].copy_from_slice(b"TOK");
            assert_eq!(all(&hay), [at, 2 * FOLD_CHUNK + 1], "word at {at}");
        }
        assert!(TrigramsAnyCase::new(&["Key"]).is_err());
    }

    #[test]
    fn digit_windows_agree_with_a_byte_by_byte_scan() {
        // Digits::next and run_end, in any order of calls (the window is
        // reloaded when a call leaves it), against the obvious scan.
        let next = |h: &[u8], i: usize| (i..h.len()).find(|&k| h[k].is_ascii_digit());
        let end = |h: &[u8], i: usize| (i..h.len()).find(|&k| !h[k].is_ascii_digit());
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        const ALPHABET: &[u8] = b"0123456789 -.()+aZ";
        for len in (0..300).chain([1000, 4099]) {
            let h: Vec<u8> = (0..len)
                .map(|_| {
                    // Long digit runs too: half the bytes are digits.
                    let r = rnd();
                    if r % 2 == 0 {
                        b'0' + (r >> 8) as u8 % 10
                    } else {
                        ALPHABET[(r >> 8) as usize % ALPHABET.len()]
                    }
                })
                .collect();
            let mut d = Digits::new(&h);
            let mut order: Vec<usize> = (0..=len).collect();
            if len % 3 == 1 {
                order.reverse();
            }
            for &i in &order {
                assert_eq!(d.next(i), next(&h, i), "next({i}) in {len} bytes");
                if h.get(i).is_some_and(u8::is_ascii_digit) {
                    assert_eq!(d.run_end(i), end(&h, i).unwrap_or(len), "run_end({i})");
                }
            }
        }
        // Every position of a lone digit, across the 64-byte windows.
        let mut s = vec![b'a'; 200];
        for p in 0..200 {
            s[p] = b'7';
            assert_eq!(Digits::new(&s).next(0), Some(p));
            assert_eq!(Digits::new(&s).next(p + 1), None);
            assert_eq!(Digits::new(&s).run_end(p), p + 1);
            s[p] = b'a';
        }
    }
}
