//! DLP settings: plain serde data (RON in the policy file), validated once by
//! [`crate::dlp::Engine::compile`] and never looked at again on the hot path.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How a finding's value is rewritten in the forwarded content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskStyle {
    /// `[REDACTED:credit-card]`
    Redact,
    /// Every letter or digit but the last four becomes `*`; separators stay
    /// (`****-****-****-1111`). Values shorter than 8 are masked whole.
    KeepLast4,
    /// `tok_` + 16 base32 characters of a keyed BLAKE3 hash of the value
    /// (under a key derived from the host key, see `mask.rs`): the
    /// same value always gives the same token, so events correlate without
    /// carrying the value.
    Token,
}

/// What a finding is about: a credential, personal data, or internal
/// infrastructure. Only secrets have home hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetectorClass {
    Secret,
    Pii,
    Infrastructure,
}

/// A check that runs on a candidate value after its regex matched.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValidatorSettings {
    /// Luhn checksum over the digits (separators ignored).
    Luhn,
    /// ISO 7064 mod 97 == 1 over the alphanumerics (IBAN-style).
    Mod97,
    /// Shannon entropy of the value, in bits per byte, at least this much.
    Entropy(f64),
}

/// A detector written by the operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomDetectorSettings {
    /// Kebab-case name, unique, not one of the built-in names.
    pub name: String,
    /// Regex (regex-automata syntax, ASCII classes). If it has capture
    /// groups, the first group that took part in the match is the value.
    pub regex: String,
    /// If not empty, a match counts only when one of these words (ASCII case
    /// insensitive) occurs within 128 bytes before it or inside it.
    #[serde(default)]
    pub keywords: Vec<String>,
    #[serde(default)]
    pub validator: Option<ValidatorSettings>,
    #[serde(default = "default_custom_mask")]
    pub mask: MaskStyle,
    #[serde(default = "default_custom_class")]
    pub class: DetectorClass,
    /// Host globs where this value is normal use (`*.corp.example`).
    #[serde(default)]
    pub home: Vec<String>,
}

fn default_custom_mask() -> MaskStyle {
    MaskStyle::Redact
}

fn default_custom_class() -> DetectorClass {
    DetectorClass::Secret
}

/// Everything the DLP engine can be told. Detector names are the kebab-case
/// names of DETECTORS.md; `"*"` in `allowlist` applies to every detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DlpSettings {
    /// Built-in detectors to run; `None` means all of them.
    pub enabled: Option<Vec<String>>,
    /// Built-in detectors not to run (applied after `enabled`).
    pub disabled: Vec<String>,
    /// Mask style overrides, by detector name.
    pub mask: BTreeMap<String, MaskStyle>,
    /// Extra known-good values (exact), by detector name or `"*"`.
    pub allowlist: BTreeMap<String, Vec<String>>,
    /// Extra known-good value patterns (regex, must match the whole value),
    /// by detector name or `"*"`.
    pub allowlist_regex: BTreeMap<String, Vec<String>>,
    /// Extra home-host globs, by detector name.
    pub home: BTreeMap<String, Vec<String>>,
    pub custom: Vec<CustomDetectorSettings>,
    /// Largest decoded (decompressed) body inspected; larger is an error so
    /// the caller can block or stream instead.
    pub max_decoded_bytes: usize,
    /// Bytes kept between chunks by the streaming scanner; the longest
    /// finding that is guaranteed to be seen whole across a chunk boundary.
    pub stream_overlap: usize,
}

impl Default for DlpSettings {
    fn default() -> Self {
        DlpSettings {
            enabled: None,
            disabled: Vec::new(),
            mask: BTreeMap::new(),
            allowlist: BTreeMap::new(),
            allowlist_regex: BTreeMap::new(),
            home: BTreeMap::new(),
            custom: Vec::new(),
            max_decoded_bytes: 64 << 20,
            stream_overlap: 16 << 10,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_deserialize_from_ron() {
        let text = r#"(
            disabled: ["phone"],
            mask: {"email": keep_last4},
            allowlist: {"*": ["not-a-secret-123"]},
            custom: [(
                name: "acme-key",
                regex: "acme_[a-z0-9]{16}",
                keywords: ["acme"],
                validator: Some(entropy(3.0)),
                home: ["*.acme.example"],
            )],
        )"#;
        let s: DlpSettings = ron::from_str(text).expect("parses");
        assert_eq!(s.disabled, vec!["phone".to_string()]);
        assert_eq!(s.mask.get("email"), Some(&MaskStyle::KeepLast4));
        assert_eq!(s.custom[0].validator, Some(ValidatorSettings::Entropy(3.0)));
        assert_eq!(s.custom[0].mask, MaskStyle::Redact);
        assert_eq!(s.max_decoded_bytes, 64 << 20);
    }
}
