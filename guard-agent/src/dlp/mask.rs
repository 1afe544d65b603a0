//! Turning a finding's value into what may be forwarded or stored: a
//! redaction marker, a keep-last-4 mask, a keyed token, or a short keyed
//! fingerprint. Both keyed outputs come from one keyed BLAKE3 hash of the
//! value (a PRF under a key derived from the host key): the token is its
//! first 80 bits, the fingerprint 48 bits further on. Disjoint bits of a PRF
//! are independent, so a token cannot be compared with a fingerprint, and
//! neither can be reversed or brute-forced without the key.
//!
//! What it must never do: hash a value without the key, or write the value
//! (or the key) anywhere.

use compact_str::CompactString;

use crate::dlp::settings::MaskStyle;

/// BLAKE3 `derive_key` context: the key for value hashes is derived from
/// the host key under this label, so the host key itself is never a BLAKE3
/// key of values (and other uses of it stay separate).
const VALUE_KEY_CONTEXT: &str = "guard 2026-11 dlp value token and fingerprint";

/// Where the token and the fingerprint are in a value's hash.
const TOKEN_BYTES: std::ops::Range<usize> = 0..10;
const FINGERPRINT_BYTES: std::ops::Range<usize> = 16..22;

/// The host's secret key for tokens and fingerprints, held as the derived
/// BLAKE3 key of value hashes. Its `Debug` never prints the key.
#[derive(Clone)]
pub struct MaskKey {
    values: [u8; 32],
}

impl MaskKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        MaskKey {
            values: blake3::derive_key(VALUE_KEY_CONTEXT, &bytes),
        }
    }

    /// The keyed hash of `value`: token and fingerprint are cut from it.
    pub(crate) fn hash(&self, value: &[u8]) -> ValueHash {
        ValueHash(*blake3::keyed_hash(&self.values, value).as_bytes())
    }
}

impl std::fmt::Debug for MaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MaskKey(..)")
    }
}

/// A value's keyed hash: compute it once per finding, then cut the token
/// and the fingerprint from it.
pub(crate) struct ValueHash([u8; 32]);

impl ValueHash {
    /// `tok_` + 16 base32 characters (80 bits), held inline.
    pub fn token(&self) -> CompactString {
        let mut out = [0u8; 20];
        out[..4].copy_from_slice(b"tok_");
        base32_into(&self.0[TOKEN_BYTES], &mut out[4..]);
        ascii(&out)
    }

    /// `fp_` + 12 hex (48 bits), held inline.
    pub fn fingerprint(&self) -> CompactString {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 15];
        out[..3].copy_from_slice(b"fp_");
        for (i, b) in self.0[FINGERPRINT_BYTES].iter().enumerate() {
            out[3 + 2 * i] = HEX[usize::from(b >> 4)];
            out[4 + 2 * i] = HEX[usize::from(b & 15)];
        }
        ascii(&out)
    }
}

/// An inline string of the ASCII bytes written here (prefixes, base32,
/// hex, or an input checked with `is_ascii`).
fn ascii(bytes: &[u8]) -> CompactString {
    debug_assert!(bytes.is_ascii());
    // SAFETY: every caller writes only ASCII (see above), which is UTF-8;
    // the debug assertion checks it in tests.
    unsafe { CompactString::from_utf8_unchecked(bytes) }
}

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// RFC 4648 base32, lowercase, no padding.
#[cfg(test)]
fn base32(bytes: &[u8]) -> String {
    let mut out = vec![0u8; (bytes.len() * 8).div_ceil(5)];
    base32_into(bytes, &mut out);
    String::from_utf8(out).expect("base32 is ASCII")
}

/// Writes RFC 4648 base32 (lowercase, no padding) of `bytes` into `out`,
/// which holds exactly `ceil(8 * bytes.len() / 5)` bytes.
fn base32_into(bytes: &[u8], out: &mut [u8]) {
    let mut acc = 0u64;
    let mut bits = 0u32;
    let mut at = 0;
    for &b in bytes {
        acc = (acc << 8) | u64::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out[at] = BASE32[((acc >> bits) & 31) as usize];
            at += 1;
        }
    }
    if bits > 0 {
        out[at] = BASE32[((acc << (5 - bits)) & 31) as usize];
    }
}

/// `tok_` + 16 base32 characters (80 bits) of the keyed hash of `value`.
pub fn token(key: &MaskKey, value: &[u8]) -> String {
    key.hash(value).token().into()
}

/// A short keyed fingerprint (`fp_` + 12 hex, 48 bits) for values such as
/// an Authorization header: enough to tell "same credential as before"
/// apart from "another one", not enough to search a dictionary without the
/// key.
pub fn fingerprint(key: &MaskKey, value: &[u8]) -> String {
    key.hash(value).fingerprint().into()
}

/// The redaction marker of a detector: `[REDACTED:<name>]`.
pub(crate) fn redaction(detector: &str) -> CompactString {
    compact_str::format_compact!("[REDACTED:{detector}]")
}

/// The replacement text for `value`, whose keyed hash is `hash`;
/// `redacted` is the detector's [`redaction`]. Inline (no allocation) up
/// to 24 bytes.
pub(crate) fn render(
    style: MaskStyle,
    redacted: &CompactString,
    hash: &ValueHash,
    value: &[u8],
) -> CompactString {
    match style {
        MaskStyle::Redact => redacted.clone(),
        MaskStyle::Token => hash.token(),
        MaskStyle::KeepLast4 => keep_last4(value),
    }
}

fn keep_last4(value: &[u8]) -> CompactString {
    const INLINE: usize = 24;
    if value.len() <= INLINE && value.is_ascii() {
        // The common case (card numbers), on the stack.
        let alnum = value.iter().filter(|b| b.is_ascii_alphanumeric()).count();
        let keep = if alnum >= 8 { 4 } else { 0 };
        let mut out = [0u8; INLINE];
        let mut seen = 0;
        for (o, &b) in out.iter_mut().zip(value) {
            *o = if b.is_ascii_alphanumeric() {
                seen += 1;
                if seen > alnum - keep {
                    b
                } else {
                    b'*'
                }
            } else {
                b
            };
        }
        return ascii(&out[..value.len()]);
    }
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

    const PINNED_TOKEN: &str = "tok_4y4rwdgxbx66husg";
    const PINNED_FINGERPRINT: &str = "fp_6cd22826b8e1";

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

    /// Tokens and fingerprints must stay stable across releases (stored
    /// events are compared with new ones): the definition is BLAKE3
    /// keyed_hash(derive_key(context, host key), value), token bytes 0..10,
    /// fingerprint bytes 16..22.
    #[test]
    fn tokens_follow_the_documented_construction() {
        let v = b"ghp_R8fK2mQ9xW4tL7vN3bH6jP1sD5gY0cZ8aE2u";
        let k = blake3::derive_key("guard 2026-11 dlp value token and fingerprint", &[5; 32]);
        let h = blake3::keyed_hash(&k, v);
        let h = h.as_bytes();
        assert_eq!(token(&key(5), v), format!("tok_{}", base32(&h[..10])));
        let hex: String = h[16..22].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(fingerprint(&key(5), v), format!("fp_{hex}"));
        // Pinned values: a change here breaks every stored fingerprint.
        assert_eq!(token(&key(5), v), PINNED_TOKEN);
        assert_eq!(fingerprint(&key(5), v), PINNED_FINGERPRINT);
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
