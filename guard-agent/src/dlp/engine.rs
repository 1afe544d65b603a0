//! The compiled engine and its single pass over the data.
//!
//! A scan is two linear passes whose cost does not grow with the number of
//! detectors:
//! 1. one Aho-Corasick automaton over every detector's literal anchors
//!    (`ghp_`, `AKIA`, `-----BEGIN`, `password`, `@`, ...); each hit runs
//!    that detector's regex only in a small window around the hit;
//! 2. one multi-pattern regex-automata DFA over the detectors that have no
//!    literal anchor (card numbers, IBANs, SSNs, phones, custom detectors).
//!
//! Validators run only on candidates. Overlapping candidates are resolved
//! by priority (a specific credential beats `password=...`, which beats
//! PII), then by length.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use aho_corasick::AhoCorasick;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use regex_automata::meta::Regex;
use regex_automata::{util::syntax, Anchored, Input, Match};

use crate::dlp::detectors::{
    Detector, BUILTIN, SECRET_FIELD_NAME, SECRET_FIELD_NAME_MAX, SECRET_FIELD_NAME_TRIGRAMS,
    SECRET_PLACEHOLDERS, SECRET_PLACEHOLDER_LITERALS,
};
use crate::dlp::mask::{self, MaskKey};
use crate::dlp::prefilter::{digit_clusters, Anchors, AnchorsBuilder, TrigramsAnyCase};
use crate::dlp::settings::{DetectorClass, DlpSettings, MaskStyle};
use crate::dlp::validators::Validator;
use crate::dlp::{DlpError, Finding, Location};

/// How far before a custom detector's match one of its keywords may be.
const KEYWORD_WINDOW: usize = 128;

/// Whether a match of `pattern` needs its capture groups resolved to find
/// the value: not when the pattern is one group with only zero-width
/// assertions (`\b`, `^`) around it, e.g. `\b(ghp_[A-Za-z0-9]{36})\b`, where
/// the group is the whole match. Resolving groups costs a second search.
fn needs_captures(pattern: &str) -> bool {
    use regex_syntax::hir::HirKind;
    let config = syntax::Config::new().unicode(false).utf8(false);
    let Ok(hir) = syntax::parse_with(pattern, &config) else {
        return true;
    };
    let groups = |h: &regex_syntax::hir::Hir| h.properties().explicit_captures_len();
    if groups(&hir) == 0 {
        return false;
    }
    match hir.kind() {
        HirKind::Capture(c) => groups(&c.sub) > 0,
        HirKind::Concat(parts) => {
            let mut seen = false;
            for p in parts {
                match p.kind() {
                    HirKind::Look(_) => {}
                    HirKind::Capture(c) if !seen && groups(&c.sub) == 0 => seen = true,
                    _ => return true,
                }
            }
            false
        }
        _ => true,
    }
}

pub(crate) fn build_regex(patterns: &[&str]) -> Result<Regex, String> {
    Regex::builder()
        .syntax(syntax::Config::new().unicode(false).utf8(false))
        .configure(Regex::config().utf8_empty(false))
        .build_many(patterns)
        .map_err(|e| e.to_string())
}

/// One detector, compiled.
pub(crate) struct Compiled {
    pub name: Arc<str>,
    /// `[REDACTED:<name>]`, made once.
    redacted: compact_str::CompactString,
    pub class: DetectorClass,
    regex: Regex,
    has_groups: bool,
    validator: Validator,
    pub mask: MaskStyle,
    allow_exact: HashSet<Vec<u8>>,
    allow_regex: Option<Regex>,
    /// Secret detectors: documentation placeholders are known-good.
    placeholders: Option<Arc<Placeholders>>,
    priority: u8,
    home: Option<GlobSet>,
    /// Custom detector with keywords: a match needs one of them (any
    /// case) at most [`KEYWORD_WINDOW`] bytes before it.
    keywords: Option<AhoCorasick>,
}

/// [`SECRET_PLACEHOLDERS`], behind an Aho-Corasick pass for its literals:
/// most values hold none of them, and one pass over a short value costs
/// less than starting a regex search.
pub(crate) struct Placeholders {
    literals: AhoCorasick,
    regex: Regex,
}

impl Placeholders {
    fn new() -> Result<Self, String> {
        Ok(Placeholders {
            literals: AhoCorasick::builder()
                .ascii_case_insensitive(true)
                .build(SECRET_PLACEHOLDER_LITERALS)
                .map_err(|e| e.to_string())?,
            regex: build_regex(&[&format!("^(?:{SECRET_PLACEHOLDERS})$")])?,
        })
    }

    pub(crate) fn matches(&self, value: &[u8]) -> bool {
        self.literals.is_match(value) && self.regex.is_match(value)
    }
}

/// A detector's known-good values: exact, by regex, and (secret
/// detectors) documentation placeholders.
type Allowlist = (HashSet<Vec<u8>>, Option<Regex>, Option<Arc<Placeholders>>);

/// A candidate that passed its validator and allowlist: which detector and
/// where the value is in the scanned bytes. Never holds the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hit {
    pub range: Range<usize>,
    pub det: usize,
}

/// The compiled DLP engine: built once from [`DlpSettings`], shared by
/// every request (`&self` only; `Send + Sync`).
pub struct Engine {
    pub(crate) detectors: Vec<Compiled>,
    by_name: HashMap<Arc<str>, usize>,
    anchors: Anchors,
    /// Built-in shapes (cards, IBANs, SSNs, phones): run only on the
    /// windows `digit_clusters` gives.
    shape: Option<Regex>,
    shape_ids: Vec<usize>,
    /// Custom detectors: run over everything.
    custom: Option<Regex>,
    custom_ids: Vec<usize>,
    pub(crate) field_name: Regex,
    /// Three bytes of every `field_name` match, found in one SIMD pass.
    field_name_trigrams: TrigramsAnyCase,
    generic: Option<usize>,
    pub(crate) key: MaskKey,
    pub(crate) max_decoded_bytes: usize,
    pub(crate) stream_overlap: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field(
                "detectors",
                &self.detectors.iter().map(|d| &*d.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn is_kebab(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn compile_home(detector: &str, globs: &[String]) -> Result<Option<GlobSet>, DlpError> {
    if globs.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for g in globs {
        let glob = GlobBuilder::new(g)
            .case_insensitive(true)
            .build()
            .map_err(|e| DlpError::BadHomeGlob {
                detector: detector.to_string(),
                pattern: g.clone(),
                reason: e.to_string(),
            })?;
        b.add(glob);
    }
    b.build().map(Some).map_err(|e| DlpError::BadHomeGlob {
        detector: detector.to_string(),
        pattern: globs.join(", "),
        reason: e.to_string(),
    })
}

impl Engine {
    /// Validates `settings` and compiles them. Errors name the detector and
    /// what is wrong with it.
    pub fn compile(settings: &DlpSettings, key: MaskKey) -> Result<Engine, DlpError> {
        let known: Vec<&str> = BUILTIN.iter().map(|d| d.name).collect();
        let check_name =
            |name: &str, field: &'static str, allow_star: bool| -> Result<(), DlpError> {
                let custom = settings.custom.iter().any(|c| c.name == name);
                if known.contains(&name) || custom || (allow_star && name == "*") {
                    Ok(())
                } else {
                    Err(DlpError::UnknownDetector {
                        name: name.to_string(),
                        field,
                        known: known.join(", "),
                    })
                }
            };
        if let Some(en) = &settings.enabled {
            for n in en {
                check_name(n, "enabled", false)?;
            }
        }
        for n in &settings.disabled {
            check_name(n, "disabled", false)?;
        }
        for n in settings.mask.keys() {
            check_name(n, "mask", false)?;
        }
        for n in settings.allowlist.keys() {
            check_name(n, "allowlist", true)?;
        }
        for n in settings.allowlist_regex.keys() {
            check_name(n, "allowlist_regex", true)?;
        }
        for n in settings.home.keys() {
            check_name(n, "home", false)?;
        }
        let mut seen = HashSet::new();
        for c in &settings.custom {
            let bad = |what: String| DlpError::BadCustom {
                name: c.name.clone(),
                what,
            };
            if !is_kebab(&c.name) {
                return Err(bad("the name must be kebab-case (a-z, 0-9, -)".into()));
            }
            if known.contains(&c.name.as_str()) {
                return Err(bad("the name is already a built-in detector".into()));
            }
            if !seen.insert(c.name.as_str()) {
                return Err(bad("the name is used twice".into()));
            }
            if c.keywords.iter().any(|k| k.is_empty()) {
                return Err(bad("a keyword is empty".into()));
            }
            if let Some(crate::dlp::settings::ValidatorSettings::Entropy(n)) = c.validator {
                if !(0.0..=8.0).contains(&n) {
                    return Err(bad(format!(
                        "entropy must be between 0 and 8 bits per byte, not {n}"
                    )));
                }
            }
        }
        if settings.stream_overlap < 64 {
            return Err(DlpError::BadSetting {
                field: "stream_overlap",
                what: "must be at least 64 bytes".into(),
            });
        }

        let enabled = |d: &Detector| {
            settings
                .enabled
                .as_ref()
                .map_or(true, |en| en.iter().any(|n| n == d.name))
                && !settings.disabled.iter().any(|n| n == d.name)
        };

        let placeholders = Arc::new(Placeholders::new().map_err(|e| DlpError::BadCustom {
            name: "secret placeholders".into(),
            what: e,
        })?);
        let allow_for = |name: &str,
                         class: DetectorClass,
                         builtin: &[&str],
                         builtin_re: &[&str]|
         -> Result<Allowlist, DlpError> {
            let mut exact: HashSet<Vec<u8>> =
                builtin.iter().map(|v| v.as_bytes().to_vec()).collect();
            for key in [name, "*"] {
                for v in settings.allowlist.get(key).into_iter().flatten() {
                    exact.insert(v.as_bytes().to_vec());
                }
            }
            let mut res: Vec<String> = builtin_re.iter().map(|r| format!("^(?:{r})$")).collect();
            for key in [name, "*"] {
                for r in settings.allowlist_regex.get(key).into_iter().flatten() {
                    build_regex(&[r.as_str()]).map_err(|e| DlpError::BadAllowRegex {
                        detector: key.to_string(),
                        pattern: r.clone(),
                        reason: e.to_string(),
                    })?;
                    res.push(format!("^(?:{r})$"));
                }
            }
            let re = if res.is_empty() {
                None
            } else {
                let refs: Vec<&str> = res.iter().map(String::as_str).collect();
                Some(build_regex(&refs).map_err(|e| DlpError::BadAllowRegex {
                    detector: name.to_string(),
                    pattern: res.join(" | "),
                    reason: e.to_string(),
                })?)
            };
            let placeholders = (class == DetectorClass::Secret).then(|| placeholders.clone());
            Ok((exact, re, placeholders))
        };

        let mut detectors = Vec::new();
        let mut anchors = AnchorsBuilder::default();
        let mut shape_patterns: Vec<String> = Vec::new();
        let mut shape_ids = Vec::new();
        let mut custom_patterns: Vec<String> = Vec::new();
        let mut custom_ids = Vec::new();

        for d in BUILTIN.iter().filter(|d| enabled(d)) {
            let regex = build_regex(&[d.pattern]).map_err(|e| DlpError::BadCustom {
                name: d.name.to_string(),
                what: format!("built-in regex does not compile: {e}"),
            })?;
            let (allow_exact, allow_regex, placeholders) =
                allow_for(d.name, d.class, d.allow_exact, d.allow_regex)?;
            let mut home: Vec<String> = d.home.iter().map(|s| s.to_string()).collect();
            home.extend(settings.home.get(d.name).into_iter().flatten().cloned());
            let idx = detectors.len();
            detectors.push(Compiled {
                name: Arc::from(d.name),
                redacted: mask::redaction(d.name),
                class: d.class,
                has_groups: needs_captures(d.pattern),
                regex,
                validator: d.validator,
                mask: settings.mask.get(d.name).copied().unwrap_or(d.mask),
                allow_exact,
                allow_regex,
                placeholders,
                priority: d.priority,
                home: compile_home(d.name, &home)?,
                keywords: None,
            });
            match d.anchor {
                Some(a) => {
                    // Key words of case-insensitive detectors may come in
                    // any case; other anchors appear as written.
                    let any_case = d.pattern.starts_with("(?i)");
                    for lit in a.literals {
                        if any_case {
                            anchors.word(lit, idx, a.back, a.span);
                        } else {
                            anchors.literal(lit, idx, a.back, a.span);
                        }
                    }
                }
                None => {
                    shape_patterns.push(d.pattern.to_string());
                    shape_ids.push(idx);
                }
            }
        }

        for c in &settings.custom {
            let regex = build_regex(&[c.regex.as_str()]).map_err(|e| DlpError::BadRegex {
                name: c.name.clone(),
                reason: e.to_string(),
            })?;
            let (allow_exact, allow_regex, placeholders) = allow_for(&c.name, c.class, &[], &[])?;
            let mut home = c.home.clone();
            home.extend(settings.home.get(&c.name).into_iter().flatten().cloned());
            let idx = detectors.len();
            detectors.push(Compiled {
                name: Arc::from(c.name.as_str()),
                redacted: mask::redaction(&c.name),
                class: c.class,
                has_groups: needs_captures(&c.regex),
                regex,
                validator: c.validator.map(Validator::from).unwrap_or(Validator::None),
                mask: settings.mask.get(&c.name).copied().unwrap_or(c.mask),
                allow_exact,
                allow_regex,
                placeholders,
                priority: if c.class == DetectorClass::Secret {
                    0
                } else {
                    2
                },
                home: compile_home(&c.name, &home)?,
                keywords: if c.keywords.is_empty() {
                    None
                } else {
                    Some(
                        AhoCorasick::builder()
                            .ascii_case_insensitive(true)
                            .build(&c.keywords)
                            .map_err(|e| DlpError::BadCustom {
                                name: c.name.clone(),
                                what: format!("keywords: {e}"),
                            })?,
                    )
                },
            });
            custom_patterns.push(c.regex.clone());
            custom_ids.push(idx);
        }

        let anchors = anchors.build().map_err(|e| DlpError::BadSetting {
            field: "anchors",
            what: e,
        })?;
        let combined = |patterns: &[String], what: &str| -> Result<Option<Regex>, DlpError> {
            if patterns.is_empty() {
                return Ok(None);
            }
            let refs: Vec<&str> = patterns.iter().map(String::as_str).collect();
            build_regex(&refs)
                .map(Some)
                .map_err(|e| DlpError::BadRegex {
                    name: what.into(),
                    reason: e.to_string(),
                })
        };
        let shape = combined(&shape_patterns, "(the combined shape pass)")?;
        let custom = combined(&custom_patterns, "(the combined custom pass)")?;
        let by_name = detectors
            .iter()
            .enumerate()
            .map(|(i, d)| (d.name.clone(), i))
            .collect();
        let generic = detectors.iter().position(|d| &*d.name == "generic-secret");
        Ok(Engine {
            detectors,
            by_name,
            anchors,
            shape,
            shape_ids,
            custom,
            custom_ids,
            field_name: build_regex(&[SECRET_FIELD_NAME])
                .expect("built-in field-name regex compiles"),
            field_name_trigrams: TrigramsAnyCase::new(SECRET_FIELD_NAME_TRIGRAMS)
                .expect("built-in field-name trigrams are three lower-case bytes"),
            generic,
            key,
            max_decoded_bytes: settings.max_decoded_bytes,
            stream_overlap: settings.stream_overlap,
        })
    }

    /// Whether `host` is a home of `detector`: a credential sent to its own
    /// service is normal use, elsewhere a leak. PII and unknown detectors
    /// have no home. `host` may carry a port or a trailing dot.
    pub fn goes_home(&self, detector: &str, host: &str) -> bool {
        let Some(&i) = self.by_name.get(detector) else {
            return false;
        };
        match &self.detectors[i].home {
            Some(set) => set.is_match(normalize_host(host)),
            None => false,
        }
    }

    /// The enabled detectors, in scan order.
    pub fn detectors(&self) -> impl Iterator<Item = (&str, DetectorClass, MaskStyle)> {
        self.detectors.iter().map(|d| (&*d.name, d.class, d.mask))
    }

    /// Every candidate in `hay`, validated, overlaps resolved, by start.
    /// `field` is the name the value sits under (JSON key, form field,
    /// header), if any: a secret-sounding name makes the whole value a
    /// generic-secret candidate.
    pub(crate) fn detect(&self, hay: &[u8], field: Option<&str>) -> Vec<Hit> {
        let mut hits = Vec::new();
        self.anchors.each(hay, |det, at, back, span| {
            self.confirm(det, hay, at, back, span, &mut hits)
        });
        if let Some(shape) = &self.shape {
            let mut done = 0;
            let mut runs = Vec::new();
            digit_clusters(hay, &mut runs, |w| {
                let from = w.start.max(done);
                if from < w.end {
                    done = self.shapes_in(shape, &self.shape_ids, hay, from..w.end, &mut hits);
                }
            });
        }
        if let Some(custom) = &self.custom {
            self.shapes_in(custom, &self.custom_ids, hay, 0..hay.len(), &mut hits);
        }
        if let (Some(field), Some(g)) = (field, self.generic) {
            if (8..=256).contains(&hay.len())
                && !hay.iter().any(u8::is_ascii_whitespace)
                && self.field_name.is_match(field.as_bytes())
            {
                let d = &self.detectors[g];
                if !d.allowed(hay) && d.validator.check(hay, hay, &[]) {
                    hits.push(Hit {
                        range: 0..hay.len(),
                        det: g,
                    });
                }
            }
        }
        self.resolve(hits)
    }

    /// Whether a secret-sounding field name appears anywhere in `hay`:
    /// the answer of `field_name.is_match(hay)`, with the regex run only
    /// around the places one of its trigrams is.
    pub(crate) fn names_a_secret_anywhere(&self, hay: &[u8]) -> bool {
        self.field_name_trigrams.any(hay, |at| {
            let lo = at.saturating_sub(SECRET_FIELD_NAME_MAX);
            let hi = hay.len().min(at + SECRET_FIELD_NAME_MAX);
            self.field_name.is_match(&hay[lo..hi])
        })
    }

    /// Runs a combined shape regex (patterns `ids`) over `window`; returns
    /// where it stopped.
    fn shapes_in(
        &self,
        regex: &Regex,
        ids: &[usize],
        hay: &[u8],
        window: Range<usize>,
        hits: &mut Vec<Hit>,
    ) -> usize {
        let mut at = window.start;
        while at < window.end {
            let Some(m) = regex.search(&Input::new(hay).range(at..window.end)) else {
                return window.end;
            };
            let det = ids[m.pattern().as_usize()];
            if !self.accept_gated(det, hay, m, hits) {
                // The first shape at this position failed its checks;
                // another may fit here (a phone that is no card).
                for &other in ids {
                    if other == det {
                        continue;
                    }
                    let input = Input::new(hay)
                        .range(m.start()..window.end)
                        .anchored(Anchored::Yes);
                    if let Some(m2) = self.detectors[other].regex.search(&input) {
                        if self.accept_gated(other, hay, m2, hits) {
                            break;
                        }
                    }
                }
            }
            at = m.end().max(at + 1);
        }
        at
    }

    fn confirm(
        &self,
        det: usize,
        hay: &[u8],
        at: usize,
        back: usize,
        span: usize,
        out: &mut Vec<Hit>,
    ) {
        let d = &self.detectors[det];
        let hi = hay.len().min(at.saturating_add(span));
        if back == 0 {
            let input = Input::new(hay).range(at..hi).anchored(Anchored::Yes);
            if let Some(m) = d.regex.search(&input) {
                self.accept(det, hay, m, out);
            }
        } else {
            let lo = at.saturating_sub(back);
            for m in d.regex.find_iter(Input::new(hay).range(lo..hi)) {
                if m.start() > at {
                    break;
                }
                if m.end() > at {
                    self.accept(det, hay, m, out);
                }
            }
        }
    }

    fn accept_gated(&self, det: usize, hay: &[u8], m: Match, out: &mut Vec<Hit>) -> bool {
        if let Some(kw) = &self.detectors[det].keywords {
            let lo = m.start().saturating_sub(KEYWORD_WINDOW);
            if kw.find(&hay[lo..m.end()]).is_none() {
                return false;
            }
        }
        self.accept(det, hay, m, out)
    }

    /// Runs captures (if any), allowlist and validator on one match.
    fn accept(&self, det: usize, hay: &[u8], m: Match, out: &mut Vec<Hit>) -> bool {
        let d = &self.detectors[det];
        let range = if d.has_groups {
            let mut caps = d.regex.create_captures();
            d.regex.search_captures(
                &Input::new(hay).range(m.range()).anchored(Anchored::Yes),
                &mut caps,
            );
            (1..caps.group_len())
                .find_map(|g| caps.get_group(g))
                .map(|s| s.range())
                .unwrap_or(m.range())
        } else {
            m.range()
        };
        let value = &hay[range.clone()];
        let after = &hay[m.end()..hay.len().min(m.end() + 2)];
        if value.is_empty() || d.allowed(value) || !d.validator.check(value, &hay[m.range()], after)
        {
            return false;
        }
        out.push(Hit { range, det });
        true
    }

    pub(crate) fn resolve(&self, mut hits: Vec<Hit>) -> Vec<Hit> {
        hits.sort_by_key(|h| (h.range.start, h.range.end, h.det));
        hits.dedup();
        let overlapping = hits.windows(2).any(|w| w[1].range.start < w[0].range.end);
        if !overlapping {
            return hits;
        }
        hits.sort_by_key(|h| {
            (
                self.detectors[h.det].priority,
                usize::MAX - h.range.len(),
                h.range.start,
            )
        });
        let mut kept: BTreeMap<usize, Hit> = BTreeMap::new();
        for h in hits {
            let before = kept
                .range(..=h.range.start)
                .next_back()
                .is_some_and(|(_, k)| k.range.end > h.range.start);
            let after = kept
                .range(h.range.start..)
                .next()
                .is_some_and(|(&s, _)| s < h.range.end);
            if !before && !after {
                kept.insert(h.range.start, h);
            }
        }
        kept.into_values().collect()
    }

    /// Builds the finding for a hit whose value is `value`, and the text
    /// that replaces it.
    pub(crate) fn finding(
        &self,
        det: usize,
        value: &[u8],
        location: Location,
        range: Range<usize>,
    ) -> Finding {
        let d = &self.detectors[det];
        let hash = self.key.hash(value);
        Finding {
            detector: d.name.clone(),
            class: d.class,
            location,
            range,
            masked: mask::render(d.mask, &d.redacted, &hash, value),
            fingerprint: hash.fingerprint(),
        }
    }

    /// Benchmark baseline: every enabled detector's regex run over the
    /// whole input one after another, validators on each match, no
    /// prefilter. Returns the number of accepted values. Not for use on
    /// the data path.
    pub fn naive_scan(&self, hay: &[u8]) -> usize {
        let mut out = Vec::new();
        for det in 0..self.detectors.len() {
            for m in self.detectors[det].regex.find_iter(hay) {
                self.accept(det, hay, m, &mut out);
            }
        }
        out.len()
    }
}

impl Compiled {
    fn allowed(&self, value: &[u8]) -> bool {
        self.allow_exact.contains(value)
            || self.placeholders.as_ref().is_some_and(|p| p.matches(value))
            || self.allow_regex.as_ref().is_some_and(|r| r.is_match(value))
    }
}

pub(crate) fn normalize_host(host: &str) -> String {
    let h = host.trim();
    let h = if let Some(rest) = h.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if h.matches(':').count() == 1 {
        h.split(':').next().unwrap_or(h)
    } else {
        h
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// `goes_home` for the built-in detectors and their built-in homes, without
/// an engine (policy compilation can use it before the engine exists).
pub fn goes_home(detector: &str, host: &str) -> bool {
    static HOMES: std::sync::OnceLock<HashMap<&'static str, GlobSet>> = std::sync::OnceLock::new();
    let homes = HOMES.get_or_init(|| {
        BUILTIN
            .iter()
            .filter_map(|d| {
                let globs: Vec<String> = d.home.iter().map(|s| s.to_string()).collect();
                compile_home(d.name, &globs)
                    .expect("built-in home globs compile")
                    .map(|g| (d.name, g))
            })
            .collect()
    });
    homes
        .get(detector)
        .is_some_and(|g| g.is_match(normalize_host(host)))
}

#[cfg(test)]
mod tests {
    use super::{build_regex, needs_captures, Placeholders};
    use crate::dlp::detectors::SECRET_PLACEHOLDERS;

    #[test]
    fn placeholder_literals_gate_exactly_what_the_regex_matches() {
        // Values built from pieces that match each alternative of the
        // regex, pieces that nearly do, and filler, in every case: the
        // gated check must agree with the bare regex on all of them.
        let bare = build_regex(&[&format!("^(?:{SECRET_PLACEHOLDERS})$")]).unwrap();
        let gated = Placeholders::new().unwrap();
        let pieces = [
            "xxxxx",
            "XXXXXXXX",
            "xxxx",
            "your_api_key",
            "YOUR-TOKEN",
            "yoursecret",
            "your_password",
            "yourpass",
            "you",
            "<key>",
            "<>",
            "<",
            ">",
            "${",
            "$",
            "{{",
            "{",
            "EXAMPLE",
            "exampl",
            "Dummy",
            "PlaceHolder",
            "changeme",
            "CHANGE_ME",
            "change-me",
            "redacted",
            "****",
            "***",
            "000000000000",
            "00000000000",
            "AKIA",
            "ghp_",
            "Q7",
            "z",
            "\n",
            "-",
            "_",
            "9",
        ];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut allowed, mut total) = (0, 0);
        for _ in 0..20_000 {
            let mut v = String::new();
            for _ in 0..(1 + rnd() % 4) {
                let p = pieces[(rnd() % pieces.len() as u64) as usize];
                v.push_str(&if rnd() % 2 == 0 {
                    p.to_ascii_uppercase()
                } else {
                    p.to_string()
                });
            }
            let want = bare.is_match(v.as_bytes());
            assert_eq!(gated.matches(v.as_bytes()), want, "{v:?}");
            allowed += usize::from(want);
            total += 1;
        }
        // Both answers occur, so the comparison means something.
        assert!(
            allowed > total / 10 && allowed < total * 9 / 10,
            "{allowed}/{total}"
        );
    }
    use crate::dlp::detectors::{
        SECRET_FIELD_NAME, SECRET_FIELD_NAME_MAX, SECRET_FIELD_NAME_TRIGRAMS,
    };
    use crate::dlp::{DlpSettings, Engine, MaskKey};

    /// The field-name regex is a finite set of words (in any case): each
    /// must hold a trigram and fit the window around it.
    #[test]
    fn every_secret_field_name_holds_a_trigram() {
        use regex_syntax::hir::literal::{ExtractKind, Extractor};
        let pattern = SECRET_FIELD_NAME.strip_prefix("(?i)").unwrap();
        let hir = regex_syntax::parse(pattern).unwrap();
        let mut ex = Extractor::new();
        ex.kind(ExtractKind::Prefix).limit_total(10_000);
        let seq = ex.extract(&hir);
        let words = seq.literals().expect("a finite set of words");
        assert!(words.len() > 20 && words.iter().all(|w| w.is_exact()));
        for w in words {
            let w = std::str::from_utf8(w.as_bytes()).unwrap();
            assert!(w.len() + 2 <= SECRET_FIELD_NAME_MAX, "{w}");
            assert!(
                SECRET_FIELD_NAME_TRIGRAMS.iter().any(|t| w.contains(t)),
                "{w} holds none of the trigrams"
            );
        }
    }

    #[test]
    fn secret_names_are_found_anywhere_like_the_regex() {
        let e = Engine::compile(&DlpSettings::default(), MaskKey::new([1; 32])).unwrap();
        let mut cases: Vec<Vec<u8>> = [
            "",
            "x",
            "pas",
            "the Passwrd",
            "my pASSword is",
            "{\"apiKey\":1}",
            "API-KEY",
            "client_secret",
            "clientsecret",
            "credentia",
            "tok",
            "TOKEN",
            "private key",
            "private_key",
            "passphrase",
            "pw d",
            "PwD",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        // Across the folding chunks (4096 bytes).
        for at in [4080, 4090, 4093, 4094, 4095, 4096, 4100] {
            let mut hay = vec![b'.'; 9000];
            hay[at..at + 13].copy_from_slice(b"Client-SECRET");
            cases.push(hay);
        }
        for hay in cases {
            assert_eq!(
                e.names_a_secret_anywhere(&hay),
                e.field_name.is_match(&hay),
                "{:?}",
                String::from_utf8_lossy(&hay)
            );
        }
    }

    #[test]
    fn captures_are_skipped_only_when_the_group_is_the_match() {
        assert!(!needs_captures(r"\b((?:AKIA|ASIA)[A-Z0-9]{16})\b"));
        assert!(!needs_captures(r"(https://hooks\.slack\.com/[a-z]+)"));
        assert!(!needs_captures(r"[0-9]{3}-[0-9]{2}"));
        assert!(needs_captures(r"key=([a-z]+)"));
        assert!(needs_captures(r"\b(npm_[a-z]{4})\b|_authToken=([a-z]+)"));
        assert!(needs_captures(r"\b([a-z]+)(?:[^a-z]|$)"));
        assert!(needs_captures(r"\b((a)b)\b"));
    }
}
