//! Where findings are: body formats (JSON, form, multipart, text), URLs and
//! headers. Each format is split into values with a [`Location`]; values
//! are scanned decoded (JSON escapes, percent-encoding undone) and masks are
//! written back encoded the same way, so the result is still valid in its
//! format.

use compact_str::CompactString;
use std::ops::Range;

use crate::dlp::encoding::{self, Encoding};
use crate::dlp::engine::Hit;
use crate::dlp::{DlpError, Engine, Finding, Location};

/// A body's format, from its Content-Type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyFormat {
    Json,
    Form,
    Multipart { boundary: String },
    Text,
}

impl BodyFormat {
    /// `application/json`, `*/*+json` → JSON; urlencoded → form;
    /// `multipart/form-data; boundary=...` → multipart; anything else text.
    pub fn from_content_type(ct: Option<&str>) -> BodyFormat {
        let Some(ct) = ct else {
            return BodyFormat::Text;
        };
        let lower = ct.to_ascii_lowercase();
        let mime = lower.split(';').next().unwrap_or("").trim();
        if mime == "application/json" || mime.ends_with("+json") || mime == "text/json" {
            BodyFormat::Json
        } else if mime == "application/x-www-form-urlencoded" {
            BodyFormat::Form
        } else if mime.starts_with("multipart/") {
            match param(ct, "boundary") {
                Some(b) if !b.is_empty() => BodyFormat::Multipart { boundary: b },
                _ => BodyFormat::Text,
            }
        } else {
            BodyFormat::Text
        }
    }
}

/// `name=value` or `name="value"` from a header value's parameters.
fn param(header: &str, name: &str) -> Option<String> {
    for p in header.split(';').skip(1) {
        let (k, v) = p.split_once('=')?;
        if k.trim().eq_ignore_ascii_case(name) {
            let v = v.trim();
            return Some(
                v.strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v)
                    .to_string(),
            );
        }
    }
    None
}

/// What an inspection found, and the rewritten content if anything was
/// found (`None`: forward the original bytes unchanged).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inspection {
    pub findings: Vec<Finding>,
    /// The masked bytes, encoded like the input (Content-Encoding
    /// re-applied for bodies); recompute Content-Length from its length.
    pub masked: Option<Vec<u8>>,
}

/// How a replacement is written back.
#[derive(Clone, Copy)]
enum Escape {
    None,
    JsonString,
    /// The hit is inside a JSON number: the whole number token becomes a
    /// JSON string.
    JsonNumber,
    Percent,
}

struct Edit {
    range: Range<usize>,
    with: Replacement,
}

/// What an edit writes: most masks need no escaping in their format and
/// are written straight from the finding (no copy per finding).
enum Replacement {
    /// `findings[i].masked` as is.
    Mask(usize),
    Bytes(Vec<u8>),
}

impl Replacement {
    fn bytes<'a>(&'a self, findings: &'a [Finding]) -> &'a [u8] {
        match self {
            Replacement::Mask(i) => findings[*i].masked.as_bytes(),
            Replacement::Bytes(b) => b,
        }
    }
}

/// Which findings are rewritten: `None` masks every finding; otherwise
/// only those whose detector name the filter accepts (the others are
/// reported but left in place).
pub type MaskFilter<'a> = Option<&'a dyn Fn(&str) -> bool>;

#[derive(Default)]
struct Collector<'a> {
    findings: Vec<Finding>,
    edits: Vec<Edit>,
    mask_only: MaskFilter<'a>,
}

impl<'a> Collector<'a> {
    fn new(mask_only: MaskFilter<'a>) -> Self {
        Collector {
            mask_only,
            ..Default::default()
        }
    }

    /// Records hits found in `decoded`, a value whose raw bytes start at
    /// `raw_start` in the inspected input; `map[i]` is the raw offset (from
    /// `raw_start`) of decoded byte `i`, `None` when decoded == raw.
    /// `location` is built only when there are hits, and once.
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        engine: &Engine,
        hits: &[Hit],
        decoded: &[u8],
        map: Option<&[usize]>,
        raw: &[u8],
        raw_start: usize,
        location: impl FnOnce() -> Location,
        escape: Escape,
    ) {
        if hits.is_empty() {
            return;
        }
        self.findings.reserve(hits.len());
        self.edits.reserve(hits.len());
        let mut location = Some(location());
        for (n, h) in hits.iter().enumerate() {
            let to_raw = |i: usize| map.map_or(i, |m| m[i]);
            let rs = raw_start + to_raw(h.range.start);
            let re = raw_start + to_raw(h.range.end);
            // The last hit takes the location; the others get copies.
            let loc = if n + 1 == hits.len() {
                location.take()
            } else {
                location.clone()
            }
            .expect("the location is taken by the last hit only");
            let f = engine.finding(h.det, &decoded[h.range.clone()], loc, rs..re);
            if self.mask_only.is_some_and(|keep| !keep(&f.detector)) {
                self.findings.push(f);
                continue;
            }
            let as_is = Replacement::Mask(self.findings.len());
            let (range, with) = match escape {
                Escape::None => (rs..re, as_is),
                Escape::JsonString if !f.masked.bytes().any(needs_json_escape) => (rs..re, as_is),
                Escape::JsonString => (rs..re, Replacement::Bytes(json_escape(&f.masked))),
                Escape::Percent if f.masked.bytes().all(percent_unreserved) => (rs..re, as_is),
                Escape::Percent => (rs..re, Replacement::Bytes(percent_encode(&f.masked))),
                Escape::JsonNumber => {
                    let (s, e) = (rs - raw_start, re - raw_start);
                    let mut text = String::from_utf8_lossy(&raw[..s]).into_owned();
                    text.push_str(&f.masked);
                    text.push_str(&String::from_utf8_lossy(&raw[e..]));
                    let mut b = vec![b'"'];
                    b.extend(json_escape(&text));
                    b.push(b'"');
                    (raw_start..raw_start + raw.len(), Replacement::Bytes(b))
                }
            };
            self.findings.push(f);
            self.edits.push(Edit { range, with });
        }
    }

    fn finish(mut self, input: &[u8]) -> (Vec<Finding>, Option<Vec<u8>>) {
        if self.edits.is_empty() {
            self.findings.sort_by_key(|f| (f.range.start, f.range.end));
            return (self.findings, None);
        }
        self.edits.sort_by_key(|e| (e.range.start, e.range.end));
        let findings = &self.findings;
        let bytes = |e: &Edit| e.with.bytes(findings).len();
        // Sized once: no growing (and copying) a body-sized buffer.
        let (mut len, mut at) = (input.len(), 0);
        for e in &self.edits {
            if e.range.start >= at {
                len = len - e.range.len() + bytes(e);
                at = e.range.end;
            }
        }
        let mut out = Vec::with_capacity(len);
        let mut at = 0;
        for e in &self.edits {
            if e.range.start < at {
                continue; // overlaps an edit already applied (same number token)
            }
            out.extend_from_slice(&input[at..e.range.start]);
            out.extend_from_slice(e.with.bytes(findings));
            at = e.range.end;
        }
        out.extend_from_slice(&input[at..]);
        debug_assert_eq!(out.len(), len);
        self.findings.sort_by_key(|f| (f.range.start, f.range.end));
        (self.findings, Some(out))
    }
}

fn json_escape(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

/// Whether `json_escape` rewrites this byte.
fn needs_json_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Whether `percent_encode` keeps this byte as is.
fn percent_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'*')
}

fn percent_encode(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for &b in s.as_bytes() {
        if percent_unreserved(b) {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes (and `+` → space if `plus`), with the raw offset of every
/// decoded byte plus one past the end.
fn percent_decode(raw: &[u8], plus: bool) -> (Vec<u8>, Vec<usize>) {
    let mut out = Vec::with_capacity(raw.len());
    let mut map = Vec::with_capacity(raw.len() + 1);
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' && i + 2 < raw.len() {
            if let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2])) {
                out.push(h * 16 + l);
                map.push(i);
                i += 3;
                continue;
            }
        }
        out.push(if plus && b == b'+' { b' ' } else { b });
        map.push(i);
        i += 1;
    }
    map.push(raw.len());
    (out, map)
}

fn needs_percent_decode(raw: &[u8], plus: bool) -> bool {
    raw.iter().any(|&b| b == b'%' || (plus && b == b'+'))
}

impl Engine {
    /// Inspects a request body. `content_type` picks the format,
    /// `content_encoding` (e.g. `gzip`) is undone for inspection and
    /// re-applied to the masked bytes. Finding ranges are in the decoded
    /// body.
    pub fn inspect_body(
        &self,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        body: &[u8],
    ) -> Result<Inspection, DlpError> {
        self.inspect_body_scoped(content_type, content_encoding, body, None)
    }

    /// [`Engine::inspect_body`], rewriting only the findings `mask_only`
    /// accepts (all are still reported).
    pub fn inspect_body_scoped(
        &self,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        body: &[u8],
        mask_only: MaskFilter<'_>,
    ) -> Result<Inspection, DlpError> {
        let codings = match content_encoding {
            Some(ce) => Encoding::parse_list(ce)?,
            None => Vec::new(),
        };
        let decoded = encoding::decode_all(&codings, body, self.max_decoded_bytes)?;
        let mut c = Collector::new(mask_only);
        match BodyFormat::from_content_type(content_type) {
            BodyFormat::Json => {
                if !self.collect_json(&decoded, &mut c) {
                    c = Collector::new(mask_only);
                    self.collect_text(&decoded, 0, None, &Location::Text, &mut c);
                }
            }
            BodyFormat::Form => self.collect_pairs(&decoded, 0, true, &mut c, Location::FormField),
            BodyFormat::Multipart { boundary } => {
                self.collect_multipart(&decoded, &boundary, &mut c)
            }
            BodyFormat::Text => self.collect_text(&decoded, 0, None, &Location::Text, &mut c),
        }
        let (findings, masked) = c.finish(&decoded);
        Ok(Inspection {
            findings,
            masked: masked.map(|m| encoding::encode_all(&codings, m)),
        })
    }

    /// Inspects plain bytes (location [`Location::Text`]).
    pub fn scan_text(&self, data: &[u8]) -> Inspection {
        let mut c = Collector::default();
        self.collect_text(data, 0, None, &Location::Text, &mut c);
        let (findings, masked) = c.finish(data);
        Inspection { findings, masked }
    }

    /// Inspects a command line (its arguments joined by spaces) as
    /// [`Engine::scan_text`] does, and also the argument after a flag of its
    /// own whose name sounds secret (`--api-key VALUE`, `-token VALUE`): that
    /// value is a generic-secret candidate, as a header value under that
    /// name is. (`--api-key=VALUE` is already text the scan sees.)
    pub fn scan_command_line(&self, data: &[u8]) -> Inspection {
        let mut c = Collector::default();
        self.collect_text(data, 0, None, &Location::Text, &mut c);
        let mut words = data
            .split(|&b| b == b' ')
            .scan(0, |at, w| {
                let start = *at;
                *at += w.len() + 1;
                Some((start, w))
            })
            .filter(|(_, w)| !w.is_empty())
            .peekable();
        while let Some((_, flag)) = words.next() {
            let Some(&(at, value)) = words.peek() else {
                break;
            };
            if flag.first() != Some(&b'-') || flag.contains(&b'=') {
                continue;
            }
            let name = &flag[flag.iter().take_while(|&&b| b == b'-').count()..];
            if let Ok(name) = std::str::from_utf8(name) {
                if !name.is_empty() {
                    self.collect_text(value, at, Some(name), &Location::Text, &mut c);
                }
            }
        }
        let (findings, masked) = c.finish(data);
        Inspection { findings, masked }
    }

    /// Inspects one header value; a secret-sounding header name
    /// (`X-Api-Key`) makes the whole value a generic-secret candidate.
    pub fn inspect_header(&self, name: &str, value: &[u8]) -> Inspection {
        self.inspect_header_scoped(name, value, None)
    }

    /// [`Engine::inspect_header`], rewriting only what `mask_only` accepts.
    pub fn inspect_header_scoped(
        &self,
        name: &str,
        value: &[u8],
        mask_only: MaskFilter<'_>,
    ) -> Inspection {
        let lower = name.to_ascii_lowercase();
        let mut c = Collector::new(mask_only);
        self.collect_text(
            value,
            0,
            Some(&lower),
            &Location::Header(lower.clone()),
            &mut c,
        );
        let (findings, masked) = c.finish(value);
        Inspection { findings, masked }
    }

    /// Inspects a request target (`/path?query`, or an absolute URL): the
    /// path and every query parameter. Ranges are in `target`.
    pub fn inspect_url(&self, target: &str) -> Inspection {
        self.inspect_url_scoped(target, None)
    }

    /// [`Engine::inspect_url`], rewriting only what `mask_only` accepts.
    pub fn inspect_url_scoped(&self, target: &str, mask_only: MaskFilter<'_>) -> Inspection {
        let raw = target.as_bytes();
        let (path_end, query) = match memchr::memchr(b'?', raw) {
            Some(q) => (q, Some(q + 1)),
            None => (raw.len(), None),
        };
        let query_end = memchr::memchr(b'#', raw).unwrap_or(raw.len());
        let path_end = path_end.min(query_end);
        let mut c = Collector::new(mask_only);
        let path = &raw[..path_end];
        self.collect_encoded(path, 0, false, None, &Location::UrlPath, &mut c);
        if let Some(q) = query {
            if q < query_end {
                self.collect_pairs(&raw[q..query_end], q, true, &mut c, Location::QueryParam);
            }
        }
        let (findings, masked) = c.finish(raw);
        Inspection { findings, masked }
    }

    fn collect_text(
        &self,
        data: &[u8],
        raw_start: usize,
        field: Option<&str>,
        loc: &Location,
        c: &mut Collector,
    ) {
        let hits = self.detect(data, field);
        c.add(
            self,
            &hits,
            data,
            None,
            data,
            raw_start,
            || loc.clone(),
            Escape::None,
        );
    }

    /// `a=1&b=2` pairs (form bodies, query strings) starting at `base`.
    fn collect_pairs(
        &self,
        raw: &[u8],
        base: usize,
        plus: bool,
        c: &mut Collector,
        loc: fn(String) -> Location,
    ) {
        let mut start = 0;
        for piece in raw.split(|&b| b == b'&') {
            let piece_start = start;
            start += piece.len() + 1;
            if piece.is_empty() {
                continue;
            }
            let (name_raw, value_raw, value_off) = match memchr::memchr(b'=', piece) {
                Some(eq) => (&piece[..eq], &piece[eq + 1..], eq + 1),
                None => (piece, &piece[piece.len()..], piece.len()),
            };
            let name = String::from_utf8_lossy(&percent_decode(name_raw, plus).0).into_owned();
            let location = loc(name.clone());
            let vstart = base + piece_start + value_off;
            self.collect_encoded(value_raw, vstart, plus, Some(&name), &location, c);
            // Names are data too: a body that is not really a form (or a
            // hostile one) can carry a secret before its `=`.
            self.collect_encoded(name_raw, base + piece_start, plus, None, &location, c);
        }
    }

    /// Detects in one percent-encoded (or plain) segment whose raw bytes
    /// start at `start`, recording hits and their masks in `c`.
    fn collect_encoded(
        &self,
        raw: &[u8],
        start: usize,
        plus: bool,
        field: Option<&str>,
        location: &Location,
        c: &mut Collector,
    ) {
        if needs_percent_decode(raw, plus) {
            let (dec, map) = percent_decode(raw, plus);
            let hits = self.detect(&dec, field);
            c.add(
                self,
                &hits,
                &dec,
                Some(&map),
                raw,
                start,
                || location.clone(),
                Escape::Percent,
            );
        } else {
            let hits = self.detect(raw, field);
            c.add(
                self,
                &hits,
                raw,
                None,
                raw,
                start,
                || location.clone(),
                Escape::None,
            );
        }
    }

    fn collect_multipart(&self, body: &[u8], boundary: &str, c: &mut Collector) {
        let delim = format!("--{boundary}");
        let finder = memchr::memmem::Finder::new(delim.as_bytes());
        let positions: Vec<usize> = finder.find_iter(body).collect();
        for w in positions.windows(2) {
            let mut s = w[0] + delim.len();
            if body[s..].starts_with(b"--") {
                break;
            }
            if body[s..].starts_with(b"\r\n") {
                s += 2;
            } else if body[s..].starts_with(b"\n") {
                s += 1;
            }
            // The part ends before the CRLF that precedes the next delimiter.
            let mut e = w[1];
            if e >= 2 && &body[e - 2..e] == b"\r\n" {
                e -= 2;
            } else if e >= 1 && body[e - 1] == b'\n' {
                e -= 1;
            }
            if e <= s {
                continue;
            }
            let part = &body[s..e];
            let (head_len, body_off) = match memchr::memmem::find(part, b"\r\n\r\n") {
                Some(p) => (p, p + 4),
                None => match memchr::memmem::find(part, b"\n\n") {
                    Some(p) => (p, p + 2),
                    None => continue,
                },
            };
            let head = String::from_utf8_lossy(&part[..head_len]);
            let mut name = None;
            let mut filename = None;
            for line in head.lines() {
                if let Some((k, v)) = line.split_once(':') {
                    if k.trim().eq_ignore_ascii_case("content-disposition") {
                        let v = format!("x; {}", v.split_once(';').map_or("", |(_, r)| r));
                        name = param(&v, "name");
                        filename = param(&v, "filename");
                    }
                }
            }
            let loc = Location::Multipart {
                name: name.clone(),
                filename,
            };
            self.collect_text(&part[body_off..], s + body_off, name.as_deref(), &loc, c);
        }
    }

    /// Whether walking `body` could find what one scan of its raw bytes
    /// did not. The walk adds findings only in strings it scans again:
    /// strings with escapes (scanned decoded: `\u0034` is a `4`) and
    /// strings under a secret-sounding key (scanned alone, with the key: a
    /// generic-secret candidate whatever the value). Without a backslash
    /// there is no escape; keys are raw substrings of the body, and the
    /// field-name regex has no look-around, so it matches some key only if
    /// it matches the body.
    /// Numbers and plain strings are covered by the raw scan (the walk only
    /// attributes its hits to leaves, and drops hits across leaves).
    fn json_walk_can_find_more(&self, body: &[u8], has_escapes: bool) -> bool {
        has_escapes || self.names_a_secret_anywhere(body)
    }

    /// Walks a JSON body: one scan of the whole body, hits attributed to
    /// the string or number they fall in; strings with escapes and strings
    /// under secret-sounding keys are also scanned decoded. `false` if the
    /// body is not JSON.
    fn collect_json(&self, body: &[u8], c: &mut Collector) -> bool {
        let hits = self.detect(body, None);
        let has_escapes = memchr::memchr(b'\\', body).is_some();
        if hits.is_empty() && !self.json_walk_can_find_more(body, has_escapes) {
            // Valid JSON or not (then the caller scans it as text, which is
            // the same detection over the same bytes): nothing to find.
            return true;
        }
        self.walk_json(body, hits, has_escapes, c)
    }

    /// [`Engine::inspect_body`] of a JSON body, always walking it (no
    /// shortcut for bodies where one raw scan finds nothing): for tests
    /// proving that the shortcut changes no answer.
    #[cfg(test)]
    pub(crate) fn inspect_json_walked(&self, body: &[u8]) -> Inspection {
        let mut c = Collector::new(None);
        let has_escapes = memchr::memchr(b'\\', body).is_some();
        if !self.walk_json(body, self.detect(body, None), has_escapes, &mut c) {
            c = Collector::new(None);
            self.collect_text(body, 0, None, &Location::Text, &mut c);
        }
        let (findings, masked) = c.finish(body);
        Inspection { findings, masked }
    }

    /// The walk of [`Engine::collect_json`], given the whole-body `hits` and
    /// whether the body holds a backslash anywhere.
    fn walk_json(
        &self,
        body: &[u8],
        hits: Vec<Hit>,
        body_has_escapes: bool,
        c: &mut Collector,
    ) -> bool {
        // Nearly every whole-body hit becomes a finding: size for them once.
        c.findings.reserve(hits.len());
        c.edits.reserve(hits.len());
        // Whether a key sounds secret, by key: a small direct-mapped cache
        // (keys repeat in arrays of objects; the regex costs more than a
        // hash of the key's bytes).
        let mut key_is_secret: [Option<(&[u8], bool)>; 64] = [None; 64];
        let mut secret_key = |k: Range<usize>| -> bool {
            let k: &[u8] = &body[k];
            let slot = key_slot(k);
            match key_is_secret[slot] {
                Some((key, yes)) if key == k => yes,
                _ => {
                    let yes = self.field_name.is_match(k);
                    key_is_secret[slot] = Some((k, yes));
                    yes
                }
            }
        };
        let mut hi = 0;
        // Whole-body hits inside the current leaf, in its offsets (scratch
        // space reused from leaf to leaf).
        let mut inside: Vec<Hit> = Vec::new();
        let visit = |leaf: &Leaf, path: &JsonPath| {
            let raw = &body[leaf.range.clone()];
            // Whole-body hits that fall inside this leaf.
            while hi < hits.len() && hits[hi].range.start < leaf.range.start {
                hi += 1;
            }
            inside.clear();
            let mut j = hi;
            while j < hits.len() && hits[j].range.start < leaf.range.end {
                if hits[j].range.end <= leaf.range.end {
                    let h = &hits[j];
                    inside.push(Hit {
                        range: h.range.start - leaf.range.start..h.range.end - leaf.range.start,
                        det: h.det,
                    });
                }
                j += 1;
            }
            let location = || Location::Json(path.render(body));
            // Numbers, and strings with nothing to decode under a key that
            // does not sound secret: the whole-body hits are all there is.
            let escaped =
                body_has_escapes && leaf.is_string && memchr::memchr(b'\\', raw).is_some();
            let as_is = if !leaf.is_string {
                Some(Escape::JsonNumber)
            } else if !escaped && !path.key().is_some_and(&mut secret_key) {
                Some(Escape::JsonString)
            } else {
                None
            };
            if let Some(escape) = as_is {
                if !inside.is_empty() {
                    c.add(
                        self,
                        &inside,
                        raw,
                        None,
                        raw,
                        leaf.range.start,
                        location,
                        escape,
                    );
                }
                return;
            }
            let (dec, map) = if escaped {
                json_unescape(raw)
            } else {
                (raw.to_vec(), (0..=raw.len()).collect())
            };
            let key = path
                .key()
                .map(|k| String::from_utf8_lossy(&body[k]).into_owned());
            let mut own = self.detect(&dec, key.as_deref());
            // Whole-body hits in an escaped string are in raw offsets: move
            // them to decoded offsets so both sets resolve together.
            for h in inside.drain(..) {
                let s = map.partition_point(|&r| r < h.range.start);
                let e = map.partition_point(|&r| r < h.range.end);
                own.push(Hit {
                    range: s..e,
                    det: h.det,
                });
            }
            let own = self.resolve(own);
            if own.is_empty() {
                return;
            }
            c.add(
                self,
                &own,
                &dec,
                Some(&map),
                raw,
                leaf.range.start,
                location,
                Escape::JsonString,
            );
        };
        json_walk(body, visit)
    }
}

/// A slot in a 64-entry cache for a JSON key: a multiplicative hash of its
/// first and last (up to) 8 bytes and its length, two loads instead of a
/// loop over the bytes (keys of one array of objects differ early or late:
/// `name` and `note` must not share a slot, as they would by length and end
/// bytes alone).
fn key_slot(k: &[u8]) -> usize {
    let word = |b: &[u8]| {
        let mut w = [0u8; 8];
        w[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(w)
    };
    let n = k.len().min(8);
    let h = word(&k[..n]) ^ word(&k[k.len() - n..]).rotate_left(29) ^ k.len() as u64;
    (h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as usize
}

struct Leaf {
    /// Raw bytes of the value: a string's content between the quotes, or a
    /// number's token.
    range: Range<usize>,
    is_string: bool,
}

/// Where a JSON value is: the keys (raw ranges in the document) and array
/// indices from the root, rendered as `$.a.b[0]` only for values that have
/// a finding.
#[derive(Default)]
struct JsonPath(Vec<Step>);

enum Step {
    Key(Range<usize>),
    Index(usize),
}

impl JsonPath {
    /// The key the current value sits under, if it is an object member.
    fn key(&self) -> Option<Range<usize>> {
        match self.0.last() {
            Some(Step::Key(k)) => Some(k.clone()),
            _ => None,
        }
    }

    /// `$.a.b[0]`: inline (no allocation) up to 24 bytes. Paths of plain
    /// keys and indices are put together on the stack.
    fn render(&self, doc: &[u8]) -> CompactString {
        let mut buf = [0u8; 64];
        buf[0] = b'$';
        let mut len = 1;
        let mut put = |piece: &[u8], len: &mut usize| {
            let end = *len + piece.len();
            let fits = end <= buf.len();
            if fits {
                buf[*len..end].copy_from_slice(piece);
                *len = end;
            }
            fits
        };
        for step in &self.0 {
            let done = match step {
                Step::Key(k) => {
                    let raw = &doc[k.clone()];
                    is_plain_key(raw) && put(b".", &mut len) && put(raw, &mut len)
                }
                Step::Index(n) => {
                    put(b"[", &mut len)
                        && put(itoa::Buffer::new().format(*n).as_bytes(), &mut len)
                        && put(b"]", &mut len)
                }
            };
            if !done {
                return self.render_any(doc);
            }
        }
        debug_assert!(buf[..len].is_ascii());
        // SAFETY: `$`, `.`, plain keys (ASCII by `is_plain_key`), brackets
        // and digits only: ASCII, which is UTF-8.
        unsafe { CompactString::from_utf8_unchecked(&buf[..len]) }
    }

    /// [`JsonPath::render`] for any keys (escaped, quoted, long).
    fn render_any(&self, doc: &[u8]) -> CompactString {
        let mut path = CompactString::const_new("$");
        for step in &self.0 {
            match step {
                Step::Key(k) => push_key(&mut path, &doc[k.clone()]),
                Step::Index(n) => {
                    path.push_str("[");
                    path.push_str(itoa::Buffer::new().format(*n));
                    path.push_str("]");
                }
            }
        }
        path
    }
}

/// Calls `visit(leaf, path)` for every string and number of a JSON
/// document, in order, with its path (`$.a.b[0]`). `false` if the bytes are
/// not one JSON value (with surrounding whitespace); leaves before the
/// error have been visited.
fn json_walk(b: &[u8], visit: impl FnMut(&Leaf, &JsonPath)) -> bool {
    let mut p = JsonParser {
        b,
        i: 0,
        visit,
        depth: 0,
    };
    let mut path = JsonPath::default();
    p.ws();
    if p.value(&mut path).is_none() {
        return false;
    }
    p.ws();
    p.i == b.len()
}

struct JsonParser<'a, V> {
    b: &'a [u8],
    i: usize,
    visit: V,
    depth: usize,
}

impl<V: FnMut(&Leaf, &JsonPath)> JsonParser<'_, V> {
    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    /// Consumes a string; returns its content range.
    fn string(&mut self) -> Option<Range<usize>> {
        if self.b.get(self.i) != Some(&b'"') {
            return None;
        }
        let start = self.i + 1;
        let mut j = start;
        loop {
            j = quote_or_backslash(self.b, j)?;
            if self.b[j] == b'\\' {
                j += 2;
                continue;
            }
            self.i = j + 1;
            return Some(start..j);
        }
    }

    /// Consumes one value; a string or number goes to the visitor with its
    /// path (whose last step is the key it sits under, if any).
    fn value(&mut self, path: &mut JsonPath) -> Option<()> {
        self.depth += 1;
        if self.depth > 256 {
            return None;
        }
        let c = *self.b.get(self.i)?;
        match c {
            b'"' => {
                let r = self.string()?;
                (self.visit)(
                    &Leaf {
                        range: r,
                        is_string: true,
                    },
                    path,
                );
            }
            b'{' => {
                self.i += 1;
                self.ws();
                if self.b.get(self.i) == Some(&b'}') {
                    self.i += 1;
                } else {
                    loop {
                        self.ws();
                        let k = self.string()?;
                        self.ws();
                        if self.b.get(self.i) != Some(&b':') {
                            return None;
                        }
                        self.i += 1;
                        self.ws();
                        path.0.push(Step::Key(k));
                        self.value(path)?;
                        path.0.pop();
                        self.ws();
                        match self.b.get(self.i)? {
                            b',' => self.i += 1,
                            b'}' => {
                                self.i += 1;
                                break;
                            }
                            _ => return None,
                        }
                    }
                }
            }
            b'[' => {
                self.i += 1;
                self.ws();
                if self.b.get(self.i) == Some(&b']') {
                    self.i += 1;
                } else {
                    let mut n = 0usize;
                    loop {
                        self.ws();
                        path.0.push(Step::Index(n));
                        self.value(path)?;
                        path.0.pop();
                        n += 1;
                        self.ws();
                        match self.b.get(self.i)? {
                            b',' => self.i += 1,
                            b']' => {
                                self.i += 1;
                                break;
                            }
                            _ => return None,
                        }
                    }
                }
            }
            b't' | b'f' | b'n' => {
                let lit: &[u8] = match c {
                    b't' => b"true",
                    b'f' => b"false",
                    _ => b"null",
                };
                if !self.b[self.i..].starts_with(lit) {
                    return None;
                }
                self.i += lit.len();
            }
            b'-' | b'0'..=b'9' => {
                let s = self.i;
                while self.i < self.b.len()
                    && matches!(
                        self.b[self.i],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.i += 1;
                }
                (self.visit)(
                    &Leaf {
                        range: s..self.i,
                        is_string: false,
                    },
                    path,
                );
            }
            _ => return None,
        }
        self.depth -= 1;
        Some(())
    }
}

/// The first `"` or `\\` at or after `from`. JSON strings are mostly
/// short (keys, words): 16 bytes per step inline beats a call to memchr2.
#[cfg(target_arch = "x86_64")]
fn quote_or_backslash(hay: &[u8], from: usize) -> Option<usize> {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
    };
    let mut i = from;
    // SAFETY: SSE2 is part of the x86_64 baseline; every load reads 16
    // bytes at `i` with `i + 16 <= hay.len()` checked first (unaligned
    // loads are allowed).
    unsafe {
        let quote = _mm_set1_epi8(b'"' as i8);
        let backslash = _mm_set1_epi8(b'\\' as i8);
        while i + 16 <= hay.len() {
            let v = _mm_loadu_si128(hay.as_ptr().add(i).cast::<__m128i>());
            let hit = _mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash));
            let mask = _mm_movemask_epi8(hit) as u32;
            if mask != 0 {
                return Some(i + mask.trailing_zeros() as usize);
            }
            i += 16;
        }
    }
    hay.get(i..)?
        .iter()
        .position(|&b| b == b'"' || b == b'\\')
        .map(|k| i + k)
}

/// The first `"` or `\\` at or after `from`.
#[cfg(not(target_arch = "x86_64"))]
fn quote_or_backslash(hay: &[u8], from: usize) -> Option<usize> {
    memchr::memchr2(b'"', b'\\', hay.get(from..)?).map(|k| from + k)
}

/// A key written `.key` in a path (others are written `["key"]`).
fn is_plain_key(raw: &[u8]) -> bool {
    !raw.is_empty()
        && raw
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
        && !raw[0].is_ascii_digit()
}

fn push_key(path: &mut CompactString, raw: &[u8]) {
    if is_plain_key(raw) {
        path.push('.');
        path.push_str(std::str::from_utf8(raw).unwrap_or_default());
    } else {
        let (dec, _) = json_unescape(raw);
        let name = String::from_utf8_lossy(&dec);
        path.push_str("[\"");
        path.push_str(&name.replace('\\', "\\\\").replace('"', "\\\""));
        path.push_str("\"]");
    }
}

/// Decodes JSON string content, with the raw offset of every decoded byte
/// plus one past the end.
fn json_unescape(raw: &[u8]) -> (Vec<u8>, Vec<usize>) {
    let mut out = Vec::with_capacity(raw.len());
    let mut map = Vec::with_capacity(raw.len() + 1);
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b != b'\\' || i + 1 >= raw.len() {
            out.push(b);
            map.push(i);
            i += 1;
            continue;
        }
        let start = i;
        let simple = match raw[i + 1] {
            b'"' => Some(b'"'),
            b'\\' => Some(b'\\'),
            b'/' => Some(b'/'),
            b'b' => Some(8),
            b'f' => Some(12),
            b'n' => Some(b'\n'),
            b'r' => Some(b'\r'),
            b't' => Some(b'\t'),
            _ => None,
        };
        if let Some(c) = simple {
            out.push(c);
            map.push(start);
            i += 2;
            continue;
        }
        let u = |at: usize| -> Option<u32> {
            let h = raw.get(at..at + 4)?;
            let s = std::str::from_utf8(h).ok()?;
            u32::from_str_radix(s, 16).ok()
        };
        if raw[i + 1] == b'u' {
            if let Some(hi) = u(i + 2) {
                let mut cp = hi;
                let mut len = 6;
                if (0xD800..0xDC00).contains(&hi) && raw.get(i + 6..i + 8) == Some(b"\\u") {
                    if let Some(lo) = u(i + 8).filter(|lo| (0xDC00..0xE000).contains(lo)) {
                        cp = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                        len = 12;
                    }
                }
                let ch = char::from_u32(cp).unwrap_or('\u{FFFD}');
                let mut buf = [0u8; 4];
                for &byte in ch.encode_utf8(&mut buf).as_bytes() {
                    out.push(byte);
                    map.push(start);
                }
                i += len;
                continue;
            }
        }
        out.push(b);
        map.push(i);
        i += 1;
    }
    map.push(raw.len());
    (out, map)
}
