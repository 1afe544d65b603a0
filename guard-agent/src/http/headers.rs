//! Header handling: what must not be forwarded (hop-by-hop headers) and how
//! headers are written into an event (credentials as keyed fingerprints,
//! everything else through the DLP masks).

use http::{header, HeaderMap, HeaderName};

use crate::dlp::{fingerprint, MaskKey};

/// Headers that describe one hop, never the end-to-end message.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Headers whose values are credentials: recorded as a fingerprint only.
pub const CREDENTIAL_HEADERS: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::COOKIE,
    header::SET_COOKIE,
];

/// Removes hop-by-hop headers, including those the Connection header names.
/// With `keep_upgrade`, `Connection: upgrade` and `Upgrade` stay (for a
/// WebSocket handshake forwarded as such).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if !(keep_upgrade && n == header::UPGRADE) {
            headers.remove(n);
        }
    }
    for h in HOP_BY_HOP.iter() {
        if keep_upgrade && (*h == header::UPGRADE || *h == header::CONNECTION) {
            continue;
        }
        headers.remove(h);
    }
}

/// True when `Connection` asks for the connection to close after this
/// message.
pub fn asks_to_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"))
}

/// One header as an event records it: a credential value as its keyed
/// fingerprint; any other value as `masked` (the value with every DLP
/// finding masked) when something was found, else as it is.
pub fn record_header(
    name: &HeaderName,
    value: &[u8],
    key: &MaskKey,
    masked: Option<&[u8]>,
) -> (String, String) {
    let v = if CREDENTIAL_HEADERS.contains(name) {
        fingerprint(key, value)
    } else {
        String::from_utf8_lossy(masked.unwrap_or(value)).into_owned()
    };
    (name.as_str().to_owned(), v)
}

/// Headers as an event records them ([`record_header`]); `mask(name,
/// value)` is the value with every finding masked, `None` when nothing was
/// found. It is not asked about credential headers.
pub fn record_headers(
    headers: &HeaderMap,
    key: &MaskKey,
    mask: impl Fn(&str, &[u8]) -> Option<Vec<u8>>,
) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let masked = if CREDENTIAL_HEADERS.contains(name) {
                None
            } else {
                mask(name.as_str(), value.as_bytes())
            };
            record_header(name, value.as_bytes(), key, masked.as_deref())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_including_the_named_ones() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "keep-alive, x-secret-hop".parse().unwrap(),
        );
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn credentials_are_fingerprinted_not_recorded() {
        let key = MaskKey::new([7; 32]);
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            "Bearer hunter2-very-secret".parse().unwrap(),
        );
        h.insert(header::ACCEPT, "*/*".parse().unwrap());
        let rec = record_headers(&h, &key, |_, _| None);
        let auth = &rec.iter().find(|(k, _)| k == "authorization").unwrap().1;
        assert!(auth.starts_with("fp_"), "{auth}");
        assert!(!auth.contains("hunter2"));
        assert!(rec.contains(&("accept".into(), "*/*".into())));
    }
}
