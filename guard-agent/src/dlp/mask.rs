//! Turning a finding's value into what may be forwarded or stored: a
//! redaction marker, a keep-last-4 mask, a keyed token, or a short keyed
//! fingerprint. All keyed outputs are HMAC-SHA256 under the host key, with a
//! distinct domain label per use, so a token cannot be compared with a
//! fingerprint and neither can be reversed or brute-forced without the key.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::dlp::settings::MaskStyle;

/// The host's secret key for tokens and fingerprints. Its `Debug` never
/// prints the key.
#[derive(Clone)]
pub struct MaskKey([u8; 32]);

impl MaskKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        MaskKey(bytes)
    }
}

impl std::fmt::Debug for MaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MaskKey(..)")
    }
}

fn keyed(key: &MaskKey, label: &[u8], value: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key.0).expect("HMAC takes any key length");
    mac.update(label);
    mac.update(&[0]);
    mac.update(value);
    mac.finalize().into_bytes().into()
}

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// RFC 4648 base32, lowercase, no padding.
fn base32(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let mut acc = 0u64;
    let mut bits = 0u32;
    for &b in bytes {
        acc = (acc << 8) | u64::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(BASE32[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(BASE32[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// `tok_` + 16 base32 characters (80 bits) of HMAC-SHA256(key, value).
pub fn token(key: &MaskKey, value: &[u8]) -> String {
    let mac = keyed(key, b"guard-dlp-token", value);
    format!("tok_{}", base32(&mac[..10]))
}

/// A short keyed fingerprint (`fp_` + 12 hex, 48 bits) for values such as
/// an Authorization header: enough to tell "same credential as before"
/// apart from "another one", not enough to search a dictionary without the
/// key.
pub fn fingerprint(key: &MaskKey, value: &[u8]) -> String {
    let mac = keyed(key, b"guard-dlp-fingerprint", value);
    let mut out = String::from("fp_");
    for b in &mac[..6] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The replacement text for `value` found by `detector`.
pub(crate) fn render(style: MaskStyle, detector: &str, key: &MaskKey, value: &[u8]) -> String {
    match style {
        MaskStyle::Redact => format!("[REDACTED:{detector}]"),
        MaskStyle::Token => token(key, value),
        MaskStyle::KeepLast4 => keep_last4(value),
    }
}

fn keep_last4(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    let alnum = text.chars().filter(|c| c.is_alphanumeric()).count();
    let keep = if alnum >= 8 { 4 } else { 0 };
    let mut seen = 0;
    text.chars()
        .map(|c| {
            if c.is_alphanumeric() {
                seen += 1;
                if seen > alnum - keep {
                    c
                } else {
                    '*'
                }
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> MaskKey {
        MaskKey::new([b; 32])
    }

    #[test]
    fn token_is_stable_per_key_and_value() {
        let a = token(&key(1), b"4111111111111111");
        assert_eq!(a, token(&key(1), b"4111111111111111"));
        assert_ne!(a, token(&key(1), b"4111111111111112"));
        assert_ne!(a, token(&key(2), b"4111111111111111"));
        assert!(a.starts_with("tok_") && a.len() == 20, "{a}");
        assert!(!a.contains("4111"));
    }

    #[test]
    fn fingerprint_differs_from_token_and_is_short() {
        let f = fingerprint(&key(1), b"Bearer abc");
        assert_eq!(f, fingerprint(&key(1), b"Bearer abc"));
        assert_eq!(f.len(), 15);
        assert_ne!(&f[3..], &token(&key(1), b"Bearer abc")[4..16]);
    }

    #[test]
    fn keep_last4_keeps_separators() {
        assert_eq!(keep_last4(b"4111-1111-1111-1111"), "****-****-****-1111");
        assert_eq!(keep_last4(b"4111111111111111"), "************1111");
        assert_eq!(keep_last4(b"abc12"), "*****");
    }

    #[test]
    fn base32_known_vector() {
        assert_eq!(base32(b"foobar"), "mzxw6ytboi");
    }

    #[test]
    fn key_debug_hides_bytes() {
        assert_eq!(format!("{:?}", key(7)), "MaskKey(..)");
    }
}
