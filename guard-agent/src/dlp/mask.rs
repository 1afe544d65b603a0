//! Turning a finding's value into what may be forwarded or stored: a
//! redaction marker, a keep-last-4 mask, a keyed token, or a short keyed
//! fingerprint. All keyed outputs are HMAC-SHA256 under the host key, with a
//! distinct domain label per use, so a token cannot be compared with a
//! fingerprint and neither can be reversed or brute-forced without the key.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::dlp::settings::MaskStyle;

const TOKEN_LABEL: &[u8] = b"guard-dlp-token";
const FINGERPRINT_LABEL: &[u8] = b"guard-dlp-fingerprint";

/// The host's secret key for tokens and fingerprints, held as HMAC states
/// already keyed and fed their domain label (`label || 0`), so that each
/// value costs two SHA-256 blocks, not four. Its `Debug` never prints the
/// key.
#[derive(Clone)]
pub struct MaskKey {
    token: Hmac<Sha256>,
    fingerprint: Hmac<Sha256>,
}

impl MaskKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        let labelled = |label: &[u8]| {
            let mut mac =
                <Hmac<Sha256> as Mac>::new_from_slice(&bytes).expect("HMAC takes any key length");
            mac.update(label);
            mac.update(&[0]);
            mac
        };
        MaskKey {
            token: labelled(TOKEN_LABEL),
            fingerprint: labelled(FINGERPRINT_LABEL),
        }
    }
}

impl std::fmt::Debug for MaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MaskKey(..)")
    }
}

/// HMAC-SHA256(key, label || 0 || value), from a state that holds the
/// key and the label.
fn keyed(labelled: &Hmac<Sha256>, value: &[u8]) -> [u8; 32] {
    let mut mac = labelled.clone();
    mac.update(value);
    mac.finalize().into_bytes().into()
}

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// RFC 4648 base32, lowercase, no padding.
#[cfg(test)]
fn base32(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    base32_into(bytes, &mut out);
    out
}

/// Appends RFC 4648 base32 (lowercase, no padding) of `bytes` to `out`.
fn base32_into(bytes: &[u8], out: &mut String) {
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
}

/// `tok_` + 16 base32 characters (80 bits) of HMAC-SHA256(key, value).
pub fn token(key: &MaskKey, value: &[u8]) -> String {
    let mac = keyed(&key.token, value);
    let mut out = String::with_capacity(20);
    out.push_str("tok_");
    base32_into(&mac[..10], &mut out);
    out
}

/// A short keyed fingerprint (`fp_` + 12 hex, 48 bits) for values such as
/// an Authorization header: enough to tell "same credential as before"
/// apart from "another one", not enough to search a dictionary without the
/// key.
pub fn fingerprint(key: &MaskKey, value: &[u8]) -> String {
    let mac = keyed(&key.fingerprint, value);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(15);
    out.push_str("fp_");
    for b in &mac[..6] {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 15)] as char);
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

    /// Tokens and fingerprints already stored must keep matching new ones:
    /// the definition is HMAC-SHA256(key, label || 0 || value).
    #[test]
    fn tokens_follow_the_documented_construction() {
        let direct = |label: &[u8], value: &[u8]| -> Vec<u8> {
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&[5; 32]).unwrap();
            mac.update(label);
            mac.update(&[0]);
            mac.update(value);
            mac.finalize().into_bytes().to_vec()
        };
        let v = b"ghp_R8fK2mQ9xW4tL7vN3bH6jP1sD5gY0cZ8aE2u";
        let t = direct(b"guard-dlp-token", v);
        assert_eq!(token(&key(5), v), format!("tok_{}", base32(&t[..10])));
        let f = direct(b"guard-dlp-fingerprint", v);
        let hex: String = f[..6].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(fingerprint(&key(5), v), format!("fp_{hex}"));
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
