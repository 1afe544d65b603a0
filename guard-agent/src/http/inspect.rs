//! The inspection step of the pipeline: runs the DLP engine over a request's
//! URL, headers and body, says where each finding is and whether it goes to
//! its own service, and produces the masked forms of each part.
//!
//! Also masks what goes into events (excerpts, header values): the store
//! must never receive what masking would remove.

use std::sync::Arc;

use arc_swap::ArcSwap;

use http::{request::Parts, HeaderName, HeaderValue};

use super::headers::record_header;
use crate::{
    dlp::{Engine, Finding, Location, MaskKey},
    store::FindingRecord,
};

/// Bodies up to this size are inspected whole.
pub const MAX_INSPECT_BYTES: usize = 8 << 20;
/// Size of the body excerpts kept in events.
pub const EXCERPT_BYTES: usize = 4096;

/// Which findings to rewrite: `(detector, goes_home) -> mask it`.
pub type MaskScopeFn<'a> = &'a dyn Fn(&str, bool) -> bool;

/// The DLP engine and the host key for fingerprints and tokens. The engine
/// is swapped whole when the policy's detector settings change (reload);
/// each inspection uses one engine from start to end.
pub struct Inspector {
    engine: ArcSwap<Engine>,
    pub key: MaskKey,
}

/// One finding with where it is and whether it goes home.
#[derive(Debug, Clone)]
pub struct Located {
    pub finding: Finding,
    pub part: Part,
    pub goes_home: bool,
}

/// Which part of the request a finding is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Url,
    Header(HeaderName),
    Body,
}

/// What inspecting a request found, and its masked parts.
#[derive(Debug, Default)]
pub struct RequestInspection {
    pub findings: Vec<Located>,
    /// The masked request target (`/path?query`), if anything was found there.
    pub url: Option<String>,
    /// Masked header values.
    pub headers: Vec<(HeaderName, Vec<u8>)>,
    /// Every header as the event records it ([`record_header`]): credential
    /// values fingerprinted, every finding masked whatever the scope.
    pub header_record: Vec<(String, String)>,
    /// The masked body (same Content-Encoding), if anything was found.
    pub body: Option<Vec<u8>>,
    /// Why the body could not be inspected (unsupported encoding, too large).
    pub body_error: Option<String>,
}

fn location_text(part: &Part, loc: &Location) -> String {
    match loc {
        Location::UrlPath => "url path".into(),
        Location::QueryParam(n) => format!("query {n}"),
        Location::Header(n) => format!("header {n}"),
        Location::Json(p) => format!("body {p}"),
        Location::FormField(n) => format!("form {n}"),
        Location::Multipart { name, filename } => format!(
            "multipart {}{}",
            name.as_deref().unwrap_or("?"),
            filename
                .as_deref()
                .map(|f| format!(" ({f})"))
                .unwrap_or_default()
        ),
        Location::Text => match part {
            Part::Url => "url".into(),
            Part::Header(h) => format!("header {h}"),
            Part::Body => "body".into(),
        },
    }
}

impl Located {
    /// The finding as an event records it. The location names a field, a
    /// header or a JSON path, which come from the request and may themselves
    /// carry sensitive text: it is masked like any other recorded text.
    pub fn record(&self, inspector: &Inspector, applied: bool) -> FindingRecord {
        let location = location_text(&self.part, &self.finding.location);
        let location = match inspector.mask_for_record(location.as_bytes()) {
            Some(m) => String::from_utf8_lossy(&m).into_owned(),
            None => location,
        };
        FindingRecord {
            detector: self.finding.detector.to_string(),
            location,
            masked: self.finding.masked.to_string(),
            fingerprint: self.finding.fingerprint.to_string(),
            goes_home: self.goes_home,
            applied,
        }
    }
}

impl Inspector {
    pub fn new(engine: Engine, key: MaskKey) -> Arc<Self> {
        Arc::new(Self {
            engine: ArcSwap::from_pointee(engine),
            key,
        })
    }

    /// The engine in use now.
    pub fn engine(&self) -> Arc<Engine> {
        self.engine.load_full()
    }

    /// Serves `engine` from now on (policy reload); inspections under way
    /// finish with the engine they started with.
    pub fn replace_engine(&self, engine: Engine) {
        self.engine.store(Arc::new(engine));
    }

    /// Inspects a request: target, every header, and the (buffered) body;
    /// every finding is masked in the rewritten parts.
    pub fn inspect_request(&self, parts: &Parts, body: &[u8], host: &str) -> RequestInspection {
        self.inspect_request_scoped(parts, body, host, None)
    }

    /// [`Inspector::inspect_request`], rewriting only the findings for
    /// which `mask_only(detector, goes_home)` holds (a `Mask` verdict that
    /// names detectors, or spares credentials going home); every finding
    /// is still reported.
    pub fn inspect_request_scoped(
        &self,
        parts: &Parts,
        body: &[u8],
        host: &str,
        mask_only: Option<MaskScopeFn<'_>>,
    ) -> RequestInspection {
        let engine = self.engine.load();
        let engine: &Engine = &engine;
        let filter = mask_only.map(|f| move |det: &str| f(det, engine.goes_home(det, host)));
        let filter: crate::dlp::MaskFilter<'_> =
            filter.as_ref().map(|f| f as &dyn Fn(&str) -> bool);
        let mut out = RequestInspection::default();
        let add = |part: Part, findings: Vec<Finding>, out: &mut RequestInspection| {
            for f in findings {
                let goes_home = engine.goes_home(&f.detector, host);
                out.findings.push(Located {
                    finding: f,
                    part: part.clone(),
                    goes_home,
                });
            }
        };
        if let Some(pq) = parts.uri.path_and_query() {
            let i = engine.inspect_url_scoped(pq.as_str(), filter);
            out.url = i.masked.map(|m| String::from_utf8_lossy(&m).into_owned());
            add(Part::Url, i.findings, &mut out);
        }
        for (name, value) in parts.headers.iter() {
            let i = engine.inspect_header_scoped(name.as_str(), value.as_bytes(), filter);
            // The record masks every finding: a scoped inspection's masks
            // may leave some out.
            let rescanned;
            let all_masked = match filter {
                None => i.masked.as_deref(),
                Some(_) if i.findings.is_empty() => None,
                Some(_) => {
                    rescanned = engine.inspect_header(name.as_str(), value.as_bytes());
                    rescanned.masked.as_deref()
                }
            };
            out.header_record
                .push(record_header(name, value.as_bytes(), &self.key, all_masked));
            if let Some(m) = i.masked {
                out.headers.push((name.clone(), m));
            }
            add(Part::Header(name.clone()), i.findings, &mut out);
        }
        if !body.is_empty() {
            let ct = parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            let ce = parts
                .headers
                .get(http::header::CONTENT_ENCODING)
                .and_then(|v| v.to_str().ok());
            match engine.inspect_body_scoped(ct, ce, body, filter) {
                Ok(i) => {
                    out.body = i.masked;
                    add(Part::Body, i.findings, &mut out);
                }
                Err(e) => out.body_error = Some(e.to_string()),
            }
        }
        out
    }

    /// Masks every finding in `data` (for excerpts and other text in
    /// events, whatever the policy said about forwarding).
    pub fn mask_for_record(&self, data: &[u8]) -> Option<Vec<u8>> {
        self.engine.load().scan_text(data).masked
    }

    /// Masks every finding in a command line for an event, a secret given
    /// to a secret-sounding flag as the next argument included
    /// ([`Engine::scan_command_line`]).
    pub fn mask_command_line_for_record(&self, cmdline: &[u8]) -> Option<Vec<u8>> {
        self.engine.load().scan_command_line(cmdline).masked
    }

    /// Masks every finding in a header value for an event, as the request
    /// inspection finds them: a secret-sounding header name (`X-Api-Key`)
    /// makes the whole value a candidate, which [`Self::mask_for_record`]
    /// alone would not see.
    pub fn mask_header_for_record(&self, name: &str, value: &[u8]) -> Option<Vec<u8>> {
        self.engine.load().inspect_header(name, value).masked
    }

    /// A body excerpt for an event: the first [`EXCERPT_BYTES`], masked. The
    /// window scanned is larger than the excerpt so that a value cut by the
    /// excerpt's end is still recognised and masked whole.
    pub fn excerpt(&self, data: &[u8]) -> Option<String> {
        if data.is_empty() {
            return None;
        }
        let window = &data[..data.len().min(EXCERPT_BYTES + 512)];
        let masked = self.mask_for_record(window);
        let text = masked.as_deref().unwrap_or(window);
        let cut = text.len().min(EXCERPT_BYTES);
        Some(String::from_utf8_lossy(&text[..cut]).into_owned())
    }

    /// Applies masked header values to a header map.
    pub fn apply_headers(&self, headers: &mut http::HeaderMap, masked: &[(HeaderName, Vec<u8>)]) {
        for (name, value) in masked {
            if let Ok(v) = HeaderValue::from_bytes(value) {
                headers.insert(name.clone(), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlp::DlpSettings;

    fn inspector() -> Arc<Inspector> {
        let key = MaskKey::new([7; 32]);
        let engine = Engine::compile(&DlpSettings::default(), key.clone()).unwrap();
        Inspector::new(engine, key)
    }

    fn request(headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri("/x");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    const NAMED_ONLY: &str = "9f8e7d6c5b4a3f2e1d0c";

    #[test]
    fn a_secret_only_its_header_name_gives_away_is_masked_in_the_record() {
        let i = inspector();
        // Text alone does not look like a secret; the header name does.
        assert!(i.mask_for_record(NAMED_ONLY.as_bytes()).is_none());
        let masked = i
            .mask_header_for_record("x-api-key", NAMED_ONLY.as_bytes())
            .expect("masked by its name");
        assert!(!String::from_utf8_lossy(&masked).contains(NAMED_ONLY));
        assert!(i.mask_header_for_record("accept", b"*/*").is_none());
    }

    #[test]
    fn the_header_record_masks_every_finding_whatever_the_scope() {
        let i = inspector();
        let parts = request(&[
            ("x-api-key", NAMED_ONLY),
            ("authorization", "Bearer hunter2-very-secret"),
            ("accept", "*/*"),
        ]);
        let keep_all = |_: &str, _: bool| false;
        for scope in [None, Some(&keep_all as MaskScopeFn<'_>)] {
            let ins = i.inspect_request_scoped(&parts, b"", "api.test", scope);
            let rec = &ins.header_record;
            assert_eq!(rec.len(), 3, "{rec:?}");
            let get = |k: &str| &rec.iter().find(|(n, _)| n == k).unwrap().1;
            assert!(!get("x-api-key").contains(NAMED_ONLY), "{rec:?}");
            assert!(get("authorization").starts_with("fp_"), "{rec:?}");
            assert_eq!(get("accept"), "*/*");
            // The scope decides what is forwarded masked, not what is recorded.
            assert_eq!(ins.headers.is_empty(), scope.is_some(), "{:?}", ins.headers);
        }
    }
}
