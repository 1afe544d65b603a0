//! The names of the detectors that policy can refer to, and "did you mean".
//!
//! The DLP module owns the detectors themselves; this is only the list of
//! built-in names, their groups, and the closest-name suggestion used by
//! every "unknown name" error. Policy does not depend on `dlp`, so the two
//! lists are kept in step by hand: when a detector is added there, add its
//! name here (a test in `dlp` can assert every name it has is in this list).

use super::schema::DetectorClass;

/// Built-in detector names and the group each belongs to.
pub const BUILTIN_DETECTORS: &[(&str, DetectorClass)] = &[
    ("aws-access-key-id", DetectorClass::Secret),
    ("aws-secret-access-key", DetectorClass::Secret),
    ("github-token", DetectorClass::Secret),
    ("gitlab-token", DetectorClass::Secret),
    ("slack-token", DetectorClass::Secret),
    ("slack-webhook", DetectorClass::Secret),
    ("stripe-key", DetectorClass::Secret),
    ("google-api-key", DetectorClass::Secret),
    ("openai-key", DetectorClass::Secret),
    ("anthropic-key", DetectorClass::Secret),
    ("huggingface-token", DetectorClass::Secret),
    ("npm-token", DetectorClass::Secret),
    ("pypi-token", DetectorClass::Secret),
    ("sendgrid-key", DetectorClass::Secret),
    ("twilio-key", DetectorClass::Secret),
    ("vault-token", DetectorClass::Secret),
    ("azure-client-secret", DetectorClass::Secret),
    ("gcp-service-account", DetectorClass::Secret),
    ("url-credentials", DetectorClass::Secret),
    ("authorization-header", DetectorClass::Secret),
    ("private-key", DetectorClass::Secret),
    ("jwt", DetectorClass::Secret),
    ("generic-secret", DetectorClass::Secret),
    ("credit-card", DetectorClass::Pii),
    ("iban", DetectorClass::Pii),
    ("us-ssn", DetectorClass::Pii),
    ("email", DetectorClass::Pii),
    ("phone", DetectorClass::Pii),
    ("private-ip", DetectorClass::Other),
    // Raised by the DNS resolver's tunnelling heuristics, not by DLP.
    ("dns-tunnel", DetectorClass::Other),
];

/// Group names usable wherever a detector name is expected in a rule.
pub const GROUP_SECRET: &str = "@secret";
pub const GROUP_PII: &str = "@pii";
pub const GROUP_ANY: &str = "@any";
pub const DETECTOR_GROUPS: &[&str] = &[GROUP_SECRET, GROUP_PII, GROUP_ANY];

pub fn is_builtin(name: &str) -> bool {
    BUILTIN_DETECTORS.iter().any(|(n, _)| *n == name)
}

/// The group a name stands for, if it is one.
pub(crate) fn group_class(name: &str) -> Option<Option<DetectorClass>> {
    match name {
        GROUP_SECRET => Some(Some(DetectorClass::Secret)),
        GROUP_PII => Some(Some(DetectorClass::Pii)),
        GROUP_ANY => Some(None),
        _ => None,
    }
}

/// The candidate closest to `word`, if it is close enough to be a typo.
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// `", did you mean `x`?"` or nothing.
pub(crate) fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> String {
    match closest(word, candidates) {
        Some(c) => format!(", did you mean `{c}`?"),
        None => String::new(),
    }
}
