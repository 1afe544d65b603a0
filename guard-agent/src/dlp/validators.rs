//! Checks that run on a candidate value after its regex matched: checksums
//! (Luhn, mod 97), structural rules (SSN ranges, card issuers, JWT header)
//! and entropy. They only look at the bytes they are given: no I/O, no
//! logging, no allocation beyond small scratch buffers.

use crate::dlp::settings::ValidatorSettings;

/// A compiled validator. `value` is the reported value (capture group),
/// `whole` the full regex match around it, `after` the (up to two) bytes
/// that follow the match.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Validator {
    None,
    Luhn,
    Mod97,
    Entropy(f64),
    CreditCard,
    Iban,
    UsSsn,
    Phone,
    Jwt,
    /// generic-secret: entropy, at least one digit or symbol, not a UUID or
    /// an expression (`process.env.X`, `$VAR`).
    GenericSecret,
    /// authorization-header: Basic must decode to `user:pass`; other
    /// schemes need a token-looking value.
    AuthValue,
    /// private-ip: the address ends the dotted number it is in: no digit
    /// or dot follows, except one sentence-ending dot (`10.0.0.1.` yes,
    /// `10.0.0.1.2`, a version, no). A regex would have to match the byte
    /// after the address and capture the address, a second search per hit.
    Ipv4End,
}

impl From<ValidatorSettings> for Validator {
    fn from(v: ValidatorSettings) -> Self {
        match v {
            ValidatorSettings::Luhn => Validator::Luhn,
            ValidatorSettings::Mod97 => Validator::Mod97,
            ValidatorSettings::Entropy(n) => Validator::Entropy(n),
        }
    }
}

impl Validator {
    pub(crate) fn check(self, value: &[u8], whole: &[u8], after: &[u8]) -> bool {
        match self {
            Validator::None => true,
            Validator::Luhn => luhn(value),
            Validator::Mod97 => mod97(value) == Some(1),
            Validator::Entropy(n) => shannon_entropy(value) >= n,
            Validator::CreditCard => credit_card(value),
            Validator::Iban => iban(value),
            Validator::UsSsn => us_ssn(value),
            Validator::Phone => phone(value),
            Validator::Jwt => jwt(value),
            Validator::GenericSecret => generic_secret(value),
            Validator::AuthValue => auth_value(value, whole),
            Validator::Ipv4End => ipv4_end(after),
        }
    }
}

/// Whether `after` (the bytes after an IPv4 address) ends the dotted
/// number: nothing, or a byte that is neither digit nor dot, or one dot
/// followed by nothing or such a byte.
fn ipv4_end(after: &[u8]) -> bool {
    let ends = |b: Option<&u8>| !matches!(b, Some(b) if b.is_ascii_digit() || *b == b'.');
    match after.first() {
        Some(b'.') => ends(after.get(1)),
        first => ends(first),
    }
}

/// Luhn over the ASCII digits of `s`; other bytes are ignored. Needs 2+ digits.
pub(crate) fn luhn(s: &[u8]) -> bool {
    let mut sum = 0u32;
    let mut n = 0usize;
    for &b in s.iter().rev().filter(|b| b.is_ascii_digit()) {
        let mut d = u32::from(b - b'0');
        if n % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
        n += 1;
    }
    n >= 2 && sum % 10 == 0
}

/// ISO 7064 mod 97-10 over the alphanumerics of `s` after moving the first
/// four to the end (IBAN rule); letters count as 10..35. `None` if `s` has
/// fewer than 5 alphanumerics or other characters than those and spaces.
pub(crate) fn mod97(s: &[u8]) -> Option<u32> {
    let chars: Vec<u8> = s
        .iter()
        .copied()
        .filter(|b| *b != b' ' && *b != b'-')
        .collect();
    if chars.len() < 5 || !chars.iter().all(u8::is_ascii_alphanumeric) {
        return None;
    }
    let mut rem = 0u32;
    for &b in chars[4..].iter().chain(&chars[..4]) {
        let b = b.to_ascii_uppercase();
        if b.is_ascii_digit() {
            rem = (rem * 10 + u32::from(b - b'0')) % 97;
        } else {
            rem = (rem * 100 + u32::from(b - b'A' + 10)) % 97;
        }
    }
    Some(rem)
}

/// Shannon entropy in bits per byte.
pub(crate) fn shannon_entropy(s: &[u8]) -> f64 {
    if s.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &b in s {
        counts[b as usize] += 1;
    }
    let len = s.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / len;
            -p * p.log2()
        })
        .sum()
}

fn digits(s: &[u8]) -> Vec<u8> {
    s.iter()
        .copied()
        .filter(u8::is_ascii_digit)
        .map(|b| b - b'0')
        .collect()
}

fn prefix_num(d: &[u8], n: usize) -> u32 {
    d.iter()
        .take(n)
        .fold(0u32, |acc, &x| acc * 10 + u32::from(x))
}

/// Card numbers: one kind of separator at most, a known issuer prefix with
/// a length that issuer uses, and Luhn.
pub(crate) fn credit_card(s: &[u8]) -> bool {
    let seps: Vec<u8> = s.iter().copied().filter(|b| !b.is_ascii_digit()).collect();
    if seps.windows(2).any(|w| w[0] != w[1]) {
        return false;
    }
    let d = digits(s);
    let len = d.len();
    if !(12..=19).contains(&len) || d.iter().all(|&x| x == d[0]) {
        return false;
    }
    let p1 = prefix_num(&d, 1);
    let p2 = prefix_num(&d, 2);
    let p3 = prefix_num(&d, 3);
    let p4 = prefix_num(&d, 4);
    let p6 = prefix_num(&d, 6);
    let issuer_ok = match p1 {
        // Visa
        4 => matches!(len, 13 | 16 | 19),
        // Mastercard 51-55 and the 2-series 2221-2720; Maestro 50, 56-58
        5 => (51..=55).contains(&p2) && len == 16 || matches!(p2, 50 | 56..=58) && len >= 12,
        2 => (2221..=2720).contains(&p4) && len == 16,
        // Amex 34/37, Diners 300-305/36/38/39, JCB 3528-3589
        3 => {
            matches!(p2, 34 | 37) && len == 15
                || ((300..=305).contains(&p3) || matches!(p2, 36 | 38 | 39))
                    && (14..=19).contains(&len)
                || (3528..=3589).contains(&p4) && (16..=19).contains(&len)
        }
        // Discover 6011/644-649/65, UnionPay 62 (incl. 622126-622925), Maestro 6304/6759/676x
        6 => {
            (p4 == 6011
                || (644..=649).contains(&p3)
                || p2 == 65
                || (622126..=622925).contains(&p6)
                || p2 == 62)
                && (16..=19).contains(&len)
                || matches!(p4, 6304 | 6759 | 6761..=6763) && len >= 12
        }
        _ => false,
    };
    issuer_ok && luhn(&d.iter().map(|x| x + b'0').collect::<Vec<_>>())
}

/// IBAN length by country (ISO 13616 registry).
fn iban_length(cc: &[u8]) -> Option<usize> {
    let n = match cc {
        b"AD" => 24,
        b"AE" => 23,
        b"AL" => 28,
        b"AT" => 20,
        b"AZ" => 28,
        b"BA" => 20,
        b"BE" => 16,
        b"BG" => 22,
        b"BH" => 22,
        b"BR" => 29,
        b"BY" => 28,
        b"CH" => 21,
        b"CR" => 22,
        b"CY" => 28,
        b"CZ" => 24,
        b"DE" => 22,
        b"DK" => 18,
        b"DO" => 28,
        b"EE" => 20,
        b"EG" => 29,
        b"ES" => 24,
        b"FI" => 18,
        b"FO" => 18,
        b"FR" => 27,
        b"GB" => 22,
        b"GE" => 22,
        b"GI" => 23,
        b"GL" => 18,
        b"GR" => 27,
        b"GT" => 28,
        b"HR" => 21,
        b"HU" => 28,
        b"IE" => 22,
        b"IL" => 23,
        b"IQ" => 23,
        b"IS" => 26,
        b"IT" => 27,
        b"JO" => 30,
        b"KW" => 30,
        b"KZ" => 20,
        b"LB" => 28,
        b"LC" => 32,
        b"LI" => 21,
        b"LT" => 20,
        b"LU" => 20,
        b"LV" => 21,
        b"MC" => 27,
        b"MD" => 24,
        b"ME" => 22,
        b"MK" => 19,
        b"MR" => 27,
        b"MT" => 31,
        b"MU" => 30,
        b"NL" => 18,
        b"NO" => 15,
        b"PK" => 24,
        b"PL" => 28,
        b"PS" => 29,
        b"PT" => 25,
        b"QA" => 29,
        b"RO" => 24,
        b"RS" => 22,
        b"SA" => 24,
        b"SC" => 31,
        b"SE" => 24,
        b"SI" => 19,
        b"SK" => 24,
        b"SM" => 27,
        b"ST" => 25,
        b"SV" => 28,
        b"TL" => 23,
        b"TN" => 24,
        b"TR" => 26,
        b"UA" => 29,
        b"VA" => 22,
        b"VG" => 24,
        b"XK" => 20,
        _ => return None,
    };
    Some(n)
}

/// IBAN: known country, that country's length, mod 97 == 1.
pub(crate) fn iban(s: &[u8]) -> bool {
    let compact: Vec<u8> = s.iter().copied().filter(|b| *b != b' ').collect();
    compact.len() >= 15
        && iban_length(&compact[..2]) == Some(compact.len())
        && mod97(&compact) == Some(1)
}

/// US SSN `AAA-GG-SSSS`: area not 000, 666 or 900-999; group not 00;
/// serial not 0000; and not the famous advertising number 078-05-1120.
pub(crate) fn us_ssn(s: &[u8]) -> bool {
    let d = digits(s);
    if d.len() != 9 {
        return false;
    }
    let area = prefix_num(&d, 3);
    let group = prefix_num(&d[3..], 2);
    let serial = prefix_num(&d[5..], 4);
    area != 0
        && area != 666
        && area < 900
        && group != 0
        && serial != 0
        && !(area == 78 && group == 5 && serial == 1120)
}

/// Phone: 7 to 15 digits (E.164 max), not one repeated digit.
pub(crate) fn phone(s: &[u8]) -> bool {
    let d = digits(s);
    let min = if s.first() == Some(&b'+') { 8 } else { 7 };
    (min..=15).contains(&d.len()) && !d.iter().all(|&x| x == d[0])
}

/// Decodes base64 or base64url (padding optional). `None` on bad input.
pub(crate) fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for &b in s {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// JWT: the header segment decodes to a JSON object naming an `alg`.
pub(crate) fn jwt(s: &[u8]) -> bool {
    let header = s.split(|&b| b == b'.').next().unwrap_or_default();
    match base64_decode(header) {
        Some(h) => h.first() == Some(&b'{') && memchr::memmem::find(&h, b"\"alg\"").is_some(),
        None => false,
    }
}

fn is_uuid(s: &[u8]) -> bool {
    s.len() == 36
        && s.iter().enumerate().all(|(i, &b)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        })
}

pub(crate) fn generic_secret(s: &[u8]) -> bool {
    if s.len() < 8 || is_uuid(s) {
        return false;
    }
    // Expressions and references, not values.
    if matches!(s[0], b'$' | b'%' | b'@')
        || s.starts_with(b"process.env")
        || s.starts_with(b"os.environ")
        || s.starts_with(b"env.")
        || s.starts_with(b"secrets.")
    {
        return false;
    }
    // A dotted identifier (`config.db.password`) is code, not a secret.
    if s.iter()
        .all(|b| b.is_ascii_alphabetic() || *b == b'.' || *b == b'_')
    {
        return false;
    }
    let has_digit_or_symbol = s.iter().any(|b| !b.is_ascii_alphabetic());
    has_digit_or_symbol && shannon_entropy(s) >= 3.0
}

fn auth_value(value: &[u8], whole: &[u8]) -> bool {
    let lower = whole.to_ascii_lowercase();
    if memchr::memmem::find(&lower, b"basic").is_some() {
        return match base64_decode(value) {
            Some(d) => d.contains(&b':') && d.iter().all(|b| b.is_ascii_graphic() || *b == b' '),
            None => false,
        };
    }
    value.len() >= 16 && value.iter().any(|b| b.is_ascii_digit()) && shannon_entropy(value) >= 3.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_table() {
        for (s, ok) in [
            ("4111111111111111", true),
            ("4111111111111112", false),
            ("79927398713", true),
            ("0", false),
        ] {
            assert_eq!(luhn(s.as_bytes()), ok, "{s}");
        }
    }

    #[test]
    fn mod97_and_iban() {
        assert!(iban(b"GB82WEST12345698765432"));
        assert!(iban(b"DE89 3704 0044 0532 0130 00"));
        assert!(!iban(b"GB82WEST12345698765433"));
        assert!(!iban(b"DE89370400440532013000123")); // wrong length for DE
    }

    #[test]
    fn entropy_orders_values() {
        assert!(shannon_entropy(b"aaaaaaaa") < 0.1);
        assert!(shannon_entropy(b"aB3$xY9!qW") > 3.0);
    }

    #[test]
    fn base64_roundtrip_known() {
        assert_eq!(base64_decode(b"dXNlcjpwYXNz").unwrap(), b"user:pass");
        assert_eq!(
            base64_decode(b"eyJhbGciOiJIUzI1NiJ9").unwrap(),
            br#"{"alg":"HS256"}"#
        );
    }
}
