//! Content-Encoding: decode a body for inspection (bounded, so a
//! decompression bomb is an error rather than an out-of-memory), and encode
//! the masked result again the same way.

use std::io::{Read, Write};

use crate::dlp::DlpError;

/// One HTTP content coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    /// HTTP `deflate`: zlib-wrapped (RFC 1950); raw deflate is accepted on
    /// decode, as some servers send it.
    Deflate,
    Brotli,
    Zstd,
}

impl Encoding {
    /// Parses a Content-Encoding header value into the codings in the order
    /// they were applied (`gzip, br` = gzip first, then brotli).
    pub fn parse_list(header: &str) -> Result<Vec<Encoding>, DlpError> {
        header
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| match s.to_ascii_lowercase().as_str() {
                "identity" => Ok(Encoding::Identity),
                "gzip" | "x-gzip" => Ok(Encoding::Gzip),
                "deflate" => Ok(Encoding::Deflate),
                "br" => Ok(Encoding::Brotli),
                "zstd" => Ok(Encoding::Zstd),
                _ => Err(DlpError::UnsupportedEncoding(s.to_string())),
            })
            .collect()
    }

    fn name(self) -> &'static str {
        match self {
            Encoding::Identity => "identity",
            Encoding::Gzip => "gzip",
            Encoding::Deflate => "deflate",
            Encoding::Brotli => "br",
            Encoding::Zstd => "zstd",
        }
    }

    /// Decodes `data`; more than `limit` decoded bytes is [`DlpError::TooLarge`].
    pub fn decode(self, data: &[u8], limit: usize) -> Result<Vec<u8>, DlpError> {
        let err = |source| DlpError::Decode {
            encoding: self.name(),
            source,
        };
        match self {
            Encoding::Identity => bounded(data, limit).map_err(err),
            Encoding::Gzip => bounded(flate2::read::MultiGzDecoder::new(data), limit).map_err(err),
            Encoding::Deflate => match bounded(flate2::read::ZlibDecoder::new(data), limit) {
                Ok(v) => Ok(v),
                Err(e) if is_oversize(&e) => Err(err(e)),
                Err(_) => bounded(flate2::read::DeflateDecoder::new(data), limit).map_err(err),
            },
            Encoding::Brotli => bounded(brotli::Decompressor::new(data, 8192), limit).map_err(err),
            Encoding::Zstd => {
                let dec = zstd::stream::read::Decoder::new(data).map_err(err)?;
                bounded(dec, limit).map_err(err)
            }
        }
        .map_err(|e| match e {
            DlpError::Decode { source, .. } if is_oversize(&source) => DlpError::TooLarge { limit },
            other => other,
        })
    }

    /// Encodes `data` with this coding.
    pub fn encode(self, data: &[u8]) -> Vec<u8> {
        let io = |r: std::io::Result<Vec<u8>>| r.expect("encoding into memory does not fail");
        match self {
            Encoding::Identity => data.to_vec(),
            Encoding::Gzip => io((|| {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(data)?;
                e.finish()
            })()),
            Encoding::Deflate => io((|| {
                let mut e =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(data)?;
                e.finish()
            })()),
            Encoding::Brotli => {
                let mut out = Vec::new();
                {
                    let mut w = brotli::CompressorWriter::new(&mut out, 8192, 5, 22);
                    w.write_all(data)
                        .expect("encoding into memory does not fail");
                }
                out
            }
            Encoding::Zstd => io(zstd::stream::encode_all(data, 3)),
        }
    }
}

/// Marks the "more than the limit" error among other I/O errors.
#[derive(Debug)]
struct Oversize;

impl std::fmt::Display for Oversize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("decoded body too large")
    }
}

impl std::error::Error for Oversize {}

fn is_oversize(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|r| r.is::<Oversize>())
}

fn bounded(r: impl Read, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    r.take(limit as u64 + 1).read_to_end(&mut out)?;
    if out.len() > limit {
        return Err(std::io::Error::other(Oversize));
    }
    Ok(out)
}

/// Decodes through a list of codings (last applied, first undone).
pub(crate) fn decode_all<'d>(
    codings: &[Encoding],
    data: &'d [u8],
    limit: usize,
) -> Result<std::borrow::Cow<'d, [u8]>, DlpError> {
    let mut cur = std::borrow::Cow::Borrowed(data);
    for c in codings.iter().rev() {
        if *c != Encoding::Identity {
            cur = std::borrow::Cow::Owned(c.decode(&cur, limit)?);
        }
    }
    if cur.len() > limit {
        return Err(DlpError::TooLarge { limit });
    }
    Ok(cur)
}

/// Encodes through a list of codings, in order.
pub(crate) fn encode_all(codings: &[Encoding], data: Vec<u8>) -> Vec<u8> {
    codings.iter().fold(data, |cur, c| {
        if *c == Encoding::Identity {
            cur
        } else {
            c.encode(&cur)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_coding_round_trips() {
        let data = b"hello, card 4111 1111 1111 1111".repeat(50);
        for c in [
            Encoding::Gzip,
            Encoding::Deflate,
            Encoding::Brotli,
            Encoding::Zstd,
            Encoding::Identity,
        ] {
            let enc = c.encode(&data);
            assert_eq!(c.decode(&enc, 1 << 20).unwrap(), data, "{c:?}");
        }
    }

    #[test]
    fn bomb_is_too_large() {
        let data = vec![0u8; 1 << 20];
        let enc = Encoding::Gzip.encode(&data);
        assert!(matches!(
            Encoding::Gzip.decode(&enc, 1000),
            Err(DlpError::TooLarge { limit: 1000 })
        ));
    }

    #[test]
    fn parse_list_keeps_order_and_rejects_unknown() {
        assert_eq!(
            Encoding::parse_list("gzip, br").unwrap(),
            vec![Encoding::Gzip, Encoding::Brotli]
        );
        assert!(matches!(
            Encoding::parse_list("compress"),
            Err(DlpError::UnsupportedEncoding(_))
        ));
    }
}
