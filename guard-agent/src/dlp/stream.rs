//! Scanning and masking a body larger than memory, chunk by chunk.
//!
//! The scanner keeps a window of `overlap` bytes between rounds, so a value
//! split across chunks is seen whole: a candidate is decided only once at
//! least `overlap` bytes follow its start (or the stream ended), and a
//! candidate that touches the end of what has arrived waits for more.
//! Output is released as soon as no later finding can reach back into it.
//! Everything is treated as text ([`Location::Text`]); ranges are offsets
//! from the start of the stream.

use std::ops::Range;

use crate::dlp::{Engine, Finding, Location};

/// What one `feed` or `finish` produced: findings decided in this round and
/// the masked bytes that may be forwarded now.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StreamOutput {
    pub findings: Vec<Finding>,
    pub output: Vec<u8>,
}

/// A streaming scanner over one body. Memory stays around `3 * overlap`
/// plus the longest finding.
pub struct StreamScanner<'e> {
    engine: &'e Engine,
    overlap: usize,
    buf: Vec<u8>,
    /// Stream offset of `buf[0]`.
    buf_start: usize,
    /// Findings starting before this were decided in an earlier round.
    frontier: usize,
    /// Output has been released up to here.
    emitted: usize,
    /// Decided findings not yet applied to the output: (range, mask).
    pending: Vec<(Range<usize>, Vec<u8>)>,
    unscanned: usize,
}

impl Engine {
    /// A streaming scanner with the configured overlap (`stream_overlap`).
    pub fn stream(&self) -> StreamScanner<'_> {
        StreamScanner::with_overlap(self, self.stream_overlap)
    }
}

impl<'e> StreamScanner<'e> {
    /// A streaming scanner keeping `overlap` bytes (at least 16) between
    /// rounds.
    pub fn with_overlap(engine: &'e Engine, overlap: usize) -> Self {
        StreamScanner {
            engine,
            overlap: overlap.max(16),
            buf: Vec::new(),
            buf_start: 0,
            frontier: 0,
            emitted: 0,
            pending: Vec::new(),
            unscanned: 0,
        }
    }

    /// Adds a chunk; returns what could be decided and released.
    pub fn feed(&mut self, chunk: &[u8]) -> StreamOutput {
        self.buf.extend_from_slice(chunk);
        self.unscanned += chunk.len();
        if self.unscanned < self.overlap || self.buf.len() < 2 * self.overlap {
            return StreamOutput::default();
        }
        self.round(false)
    }

    /// Ends the stream: decides everything left and releases the rest.
    pub fn finish(mut self) -> StreamOutput {
        self.round(true)
    }

    fn round(&mut self, last: bool) -> StreamOutput {
        self.unscanned = 0;
        let end = self.buf_start + self.buf.len();
        let safe = if last { end } else { end - self.overlap };
        let decided = self.frontier.max(self.emitted);
        let mut next_frontier = safe;
        let mut findings = Vec::new();
        for h in self.engine.detect(&self.buf, None) {
            let (s, e) = (self.buf_start + h.range.start, self.buf_start + h.range.end);
            if s < decided {
                continue;
            }
            if s >= safe {
                break;
            }
            if !last && e >= end {
                next_frontier = s;
                break;
            }
            let f = self
                .engine
                .finding(h.det, &self.buf[h.range.clone()], Location::Text, s..e);
            self.pending.push((s..e, f.masked.as_bytes().to_vec()));
            findings.push(f);
        }
        self.frontier = next_frontier;

        // Release output up to the frontier, or past the end of a finding
        // that straddles it.
        let mut out_to = self.frontier;
        for (r, _) in &self.pending {
            out_to = out_to.max(r.end);
        }
        let out_to = if last { end } else { out_to.min(end) };
        let mut output = Vec::new();
        let mut at = self.emitted;
        self.pending.sort_by_key(|(r, _)| r.start);
        let mut rest = Vec::new();
        for (r, mask) in self.pending.drain(..) {
            if r.start >= out_to {
                rest.push((r, mask));
                continue;
            }
            output.extend_from_slice(&self.buf[at - self.buf_start..r.start - self.buf_start]);
            output.extend_from_slice(&mask);
            at = r.end;
        }
        self.pending = rest;
        if at < out_to {
            output.extend_from_slice(&self.buf[at - self.buf_start..out_to - self.buf_start]);
            at = out_to;
        }
        self.emitted = at;

        // Keep what is not released yet and the left context of the frontier.
        let keep_from = self
            .emitted
            .min(self.frontier.saturating_sub(self.overlap))
            .max(self.buf_start);
        self.buf.drain(..keep_from - self.buf_start);
        self.buf_start = keep_from;
        StreamOutput { findings, output }
    }
}
