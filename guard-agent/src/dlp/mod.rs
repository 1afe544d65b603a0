//! Data loss prevention: finds credentials, personal data and internal
//! topology in what a monitored process sends, and rewrites the content so
//! that what leaves (and what is recorded) carries a mask instead.
//!
//! What it is for: the HTTP pipeline hands it a URL, headers and a body
//! (any Content-Encoding, JSON / form / multipart / text); it answers with
//! [`Finding`]s (which detector, where: `$.user.card`, form field, header,
//! query parameter, multipart part; byte range) and, when something was
//! found, the rewritten bytes. Policy decides what to do with that (mask,
//! block, hold); [`Engine::goes_home`] tells it whether a credential is
//! going to its own service (normal use) or elsewhere (a leak).
//!
//! How: settings ([`DlpSettings`], plain serde data) are validated and
//! compiled once into an [`Engine`]; a scan is one Aho-Corasick pass over
//! literal anchors plus one multi-pattern DFA pass, whatever the number of
//! detectors (see `engine.rs`). Bodies larger than memory go through
//! [`StreamScanner`]. DETECTORS.md lists every detector.
//!
//! Invariants:
//! - A [`Finding`] never holds the raw value: only its mask (`[REDACTED:x]`,
//!   `****1111`, `tok_...`) and a keyed fingerprint.
//! - Masked JSON is still JSON, masked forms are still form-encoded, and a
//!   compressed body is re-compressed with the same Content-Encoding.
//! - Nothing is re-parsed on the hot path: regexes, globs and allowlists
//!   are compiled in [`Engine::compile`].
//!
//! What it must never do: send anything anywhere (it is offline and does
//! no I/O), log a value it found (it does not log at all), or depend on
//! other agent modules (it is a pure library; others depend on it).

mod detectors;
mod encoding;
mod engine;
mod formats;
mod mask;
mod prefilter;
mod settings;
mod stream;
mod validators;

use compact_str::CompactString;
use std::ops::Range;
use std::sync::Arc;

pub use detectors::{Detector, BUILTIN};
pub use encoding::Encoding;
pub use engine::{goes_home, Engine};
pub use formats::{BodyFormat, Inspection, MaskFilter};
pub use mask::{fingerprint, token, MaskKey};
pub use settings::{
    CustomDetectorSettings, DetectorClass, DlpSettings, MaskStyle, ValidatorSettings,
};
pub use stream::{StreamOutput, StreamScanner};

/// Where in a request a finding is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// The URL path.
    UrlPath,
    /// A query parameter, by (decoded) name.
    QueryParam(String),
    /// A header, by lower-case name.
    Header(String),
    /// A JSON value, by path (`$.user.cards[0].number`); inline up to 24
    /// bytes.
    Json(CompactString),
    /// An `application/x-www-form-urlencoded` field, by decoded name.
    FormField(String),
    /// A `multipart/form-data` part, by name and filename.
    Multipart {
        name: Option<String>,
        filename: Option<String>,
    },
    /// Anywhere in a plain-text (or unknown) body or stream.
    Text,
}

/// One thing found. Carries the mask and a keyed fingerprint of the value,
/// never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Kebab-case detector name (`credit-card`, `github-token`, custom ones).
    pub detector: Arc<str>,
    pub class: DetectorClass,
    pub location: Location,
    /// Byte range of the value in the inspected bytes (the decoded body,
    /// the header value, the URL, or the stream), in its encoded form
    /// (JSON escapes, percent-encoding) when it has one.
    pub range: Range<usize>,
    /// What the value was (or would be) replaced with (inline up to 24
    /// bytes: most masks cost no allocation).
    pub masked: CompactString,
    /// `fp_` + 12 hex of a keyed hash of the value: same value, same
    /// fingerprint, for this host key.
    pub fingerprint: CompactString,
}

/// Everything that can go wrong compiling settings or decoding a body.
#[derive(Debug, thiserror::Error)]
pub enum DlpError {
    #[error("dlp: custom detector `{name}`: the regex does not compile: {reason}")]
    BadRegex { name: String, reason: String },
    #[error("dlp: custom detector `{name}`: {what}")]
    BadCustom { name: String, what: String },
    #[error("dlp: `{field}` names detector `{name}`, which does not exist; known: {known}")]
    UnknownDetector {
        name: String,
        field: &'static str,
        known: String,
    },
    #[error("dlp: allowlist regex `{pattern}` for `{detector}` does not compile: {reason}")]
    BadAllowRegex {
        detector: String,
        pattern: String,
        reason: String,
    },
    #[error("dlp: home host glob `{pattern}` for `{detector}` is invalid: {reason}")]
    BadHomeGlob {
        detector: String,
        pattern: String,
        reason: String,
    },
    #[error("dlp: setting `{field}` {what}")]
    BadSetting { field: &'static str, what: String },
    #[error(
        "dlp: Content-Encoding `{0}` is not supported (gzip, deflate, br, zstd, identity are)"
    )]
    UnsupportedEncoding(String),
    #[error("dlp: body is not valid {encoding}: {source}")]
    Decode {
        encoding: &'static str,
        source: std::io::Error,
    },
    #[error("dlp: decoded body is larger than max_decoded_bytes ({limit}); stream it instead")]
    TooLarge { limit: usize },
}

#[cfg(test)]
mod tests;
