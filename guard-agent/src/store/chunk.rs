//! How events sit in the store: a run of events written together is one
//! sled value (a chunk), keyed by its first event id, its events' JSON
//! records compressed with LZ4.
//!
//! Why chunks: sled copies the in-memory leaf and logs a frame on every
//! insert, whatever the value's size; one insert per event cost the agent
//! about 14 µs of CPU per HTTP request. One insert for up to
//! [`CHUNK_MAX_EVENTS`] compressed events costs about 2 µs per event, and
//! the records of one process's requests (same attribution, same headers)
//! compress about tenfold, so retention by size keeps that many more.
//!
//! Layout of a value:
//!
//! | bytes | what |
//! |---|---|
//! | 0 | format, [`FORMAT`] |
//! | 1..5 | event count, u32 LE |
//! | 5..13 | newest event's `ts`, unix nanoseconds, i64 LE |
//! | 13.. | LZ4 block, size prepended, of: the records (`serde_json`), then per event its id (u64 LE) and record length (u32 LE) |
//!
//! The header is outside the compressed block: retention and the event
//! count at open read it without decompressing. Invariant kept by the
//! writer: the ids of different chunks never interleave, so the chunk that
//! may hold id `n` is the one with the greatest key `<= n`.
//!
//! This module only encodes and decodes: it never sees unmasked content
//! that the event did not already carry.

use super::{Event, StoreError};

/// The current layout.
pub const FORMAT: u8 = 1;
/// Events per chunk at most. With records of ~2 KiB compressing to
/// ~250 bytes, a full sled leaf (16 chunks) stays under sled's inline
/// message limit (segment size / 4 = 128 KiB), so no blob files.
pub const CHUNK_MAX_EVENTS: usize = 32;
/// Uncompressed bytes per chunk at most (large excerpts compress less).
pub const CHUNK_MAX_RAW_BYTES: usize = 128 * 1024;

const HEADER_LEN: usize = 13;
const INDEX_ENTRY_LEN: usize = 12;

/// What a chunk's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub count: u32,
    /// The newest `ts` among its events, unix nanoseconds.
    pub newest_ts_nanos: i64,
}

/// Encodes events whose ids are already assigned (increasing) into
/// chunks of at most [`CHUNK_MAX_EVENTS`] events and, unless one event is
/// larger, [`CHUNK_MAX_RAW_BYTES`] of records. Returns each chunk's first
/// id (its key) and value.
pub fn encode<'a>(
    events: impl IntoIterator<Item = &'a Event>,
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let mut out = Vec::new();
    let mut open = OpenChunk::default();
    for e in events {
        if open.index.len() == CHUNK_MAX_EVENTS {
            out.push(open.finish());
        }
        let start = open.raw.len();
        serde_json::to_writer(&mut open.raw, e)?;
        let len = open.raw.len() - start;
        if !open.index.is_empty() && open.raw.len() > CHUNK_MAX_RAW_BYTES {
            // This record starts the next chunk.
            let record = open.raw.split_off(start);
            out.push(open.finish());
            open.raw = record;
        }
        let len = u32::try_from(len)
            .map_err(|_| StoreError::Corrupt(format!("event {} is larger than 4 GiB", e.id)))?;
        debug_assert!(open.index.last().map_or(true, |&(last, _)| last < e.id));
        open.index.push((e.id, len));
        open.newest = open.newest.max(e.ts.unix_timestamp_nanos());
    }
    if !open.index.is_empty() {
        out.push(open.finish());
    }
    Ok(out)
}

/// The chunk being filled: records, then (at `finish`) the index after
/// them.
struct OpenChunk {
    raw: Vec<u8>,
    index: Vec<(u64, u32)>,
    newest: i128,
}

impl Default for OpenChunk {
    fn default() -> Self {
        Self {
            raw: Vec::with_capacity(64 * 1024),
            index: Vec::with_capacity(CHUNK_MAX_EVENTS),
            newest: i128::MIN,
        }
    }
}

impl OpenChunk {
    fn finish(&mut self) -> (u64, Vec<u8>) {
        let first = self.index[0].0;
        let count = self.index.len() as u32;
        for (id, len) in self.index.drain(..) {
            self.raw.extend_from_slice(&id.to_le_bytes());
            self.raw.extend_from_slice(&len.to_le_bytes());
        }
        let newest = self.newest.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
        let mut value = Vec::with_capacity(HEADER_LEN + 4 + self.raw.len() / 4);
        value.push(FORMAT);
        value.extend_from_slice(&count.to_le_bytes());
        value.extend_from_slice(&newest.to_le_bytes());
        value.extend_from_slice(&lz4_flex::compress_prepend_size(&self.raw));
        self.raw.clear();
        self.newest = i128::MIN;
        (first, value)
    }
}

/// Reads a value's header.
pub fn header(value: &[u8]) -> Result<ChunkHeader, StoreError> {
    if value.len() < HEADER_LEN {
        return Err(StoreError::Corrupt(format!(
            "a chunk of {} bytes is shorter than its header",
            value.len()
        )));
    }
    if value[0] != FORMAT {
        return Err(StoreError::Corrupt(format!(
            "chunk format {} is not {FORMAT} (written by a newer guard-agent?)",
            value[0]
        )));
    }
    Ok(ChunkHeader {
        count: u32::from_le_bytes(value[1..5].try_into().unwrap()),
        newest_ts_nanos: i64::from_le_bytes(value[5..13].try_into().unwrap()),
    })
}

/// A decompressed chunk: its records and index, decoded one at a time.
#[derive(Debug)]
pub struct Chunk {
    raw: Vec<u8>,
    count: usize,
    /// Where the index starts (after the records).
    index_at: usize,
}

impl Chunk {
    pub fn open(value: &[u8]) -> Result<Self, StoreError> {
        let h = header(value)?;
        let raw = lz4_flex::decompress_size_prepended(&value[HEADER_LEN..])
            .map_err(|e| StoreError::Corrupt(format!("chunk does not decompress: {e}")))?;
        let count = h.count as usize;
        let Some(index_at) = raw.len().checked_sub(count * INDEX_ENTRY_LEN) else {
            return Err(StoreError::Corrupt(format!(
                "chunk of {count} events holds {} bytes",
                raw.len()
            )));
        };
        let chunk = Self {
            raw,
            count,
            index_at,
        };
        let records: usize = (0..count).map(|i| chunk.entry(i).1 as usize).sum();
        if records != index_at {
            return Err(StoreError::Corrupt(format!(
                "chunk index names {records} bytes of records, it holds {index_at}"
            )));
        }
        Ok(chunk)
    }

    fn entry(&self, i: usize) -> (u64, u32) {
        let at = self.index_at + i * INDEX_ENTRY_LEN;
        let slot = &self.raw[at..at + INDEX_ENTRY_LEN];
        (
            u64::from_le_bytes(slot[..8].try_into().unwrap()),
            u32::from_le_bytes(slot[8..].try_into().unwrap()),
        )
    }

    /// The decompressed records and index.
    pub fn into_raw(self) -> Vec<u8> {
        self.raw
    }

    /// Each event's id and record, in order.
    fn records(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        let mut start = 0;
        (0..self.count).map(move |i| {
            let (id, len) = self.entry(i);
            let record = &self.raw[start..start + len as usize];
            start += len as usize;
            (id, record)
        })
    }

    /// Event ids, in order.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.count).map(|i| self.entry(i).0)
    }

    /// Every event, oldest first.
    pub fn events(&self) -> Result<Vec<Event>, StoreError> {
        self.records()
            .map(|(_, record)| Ok(serde_json::from_slice(record)?))
            .collect()
    }

    /// The event with this id, if the chunk holds it.
    pub fn find(&self, id: u64) -> Result<Option<Event>, StoreError> {
        match self.records().find(|&(x, _)| x == id) {
            Some((_, record)) => Ok(Some(serde_json::from_slice(record)?)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;

    fn ev(id: u64, secs: i64) -> Event {
        let mut e = Event::connection(OffsetDateTime::from_unix_timestamp(secs).unwrap());
        e.id = id;
        e.exe = Some("/usr/bin/curl".into());
        e
    }

    #[test]
    fn a_chunk_gives_back_its_events_and_header() {
        let events: Vec<Event> = (0..5)
            .map(|i| ev(100 + i, 1_700_000_000 + i as i64))
            .collect();
        let chunks = encode(&events).unwrap();
        assert_eq!(chunks.len(), 1);
        let (key, v) = &chunks[0];
        assert_eq!(*key, 100);
        let h = header(v).unwrap();
        assert_eq!(h.count, 5);
        assert_eq!(h.newest_ts_nanos, 1_700_000_004 * 1_000_000_000);
        let c = Chunk::open(v).unwrap();
        assert_eq!(c.ids().collect::<Vec<_>>(), vec![100, 101, 102, 103, 104]);
        let back = c.events().unwrap();
        assert_eq!(back.len(), 5);
        for (a, b) in events.iter().zip(&back) {
            assert_eq!(
                serde_json::to_string(a).unwrap(),
                serde_json::to_string(b).unwrap()
            );
        }
        assert_eq!(c.find(103).unwrap().unwrap().id, 103);
        assert_eq!(c.find(104).unwrap().unwrap().id, 104);
        assert!(c.find(105).unwrap().is_none());
    }

    #[test]
    fn repetitive_records_compress() {
        let events: Vec<Event> = (0..32).map(|i| ev(i + 1, 1_700_000_000)).collect();
        let raw: usize = events
            .iter()
            .map(|e| serde_json::to_vec(e).unwrap().len())
            .sum();
        let chunks = encode(&events).unwrap();
        assert_eq!(chunks.len(), 1);
        let v = &chunks[0].1;
        assert!(v.len() * 4 < raw, "{} bytes for {raw} of records", v.len());
    }

    #[test]
    fn damaged_values_are_errors_not_panics() {
        let v = encode(&[ev(1, 0), ev(2, 0)]).unwrap().remove(0).1;
        assert!(matches!(header(&v[..5]), Err(StoreError::Corrupt(_))));
        let mut newer = v.clone();
        newer[0] = FORMAT + 1;
        assert!(Chunk::open(&newer)
            .unwrap_err()
            .to_string()
            .contains("newer"));
        let mut miscounted = v.clone();
        miscounted[1] = 3;
        assert!(matches!(
            Chunk::open(&miscounted),
            Err(StoreError::Corrupt(_))
        ));
        for cut in [HEADER_LEN, HEADER_LEN + 4, v.len() - 1] {
            assert!(Chunk::open(&v[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn chunks_respect_both_limits() {
        let keys_and_counts = |events: &[Event]| -> Vec<(u64, u32)> {
            encode(events)
                .unwrap()
                .iter()
                .map(|(k, v)| (*k, header(v).unwrap().count))
                .collect()
        };
        assert!(encode(&[]).unwrap().is_empty());
        let many: Vec<Event> = (1..=70).map(|i| ev(i, 0)).collect();
        assert_eq!(keys_and_counts(&many), vec![(1, 32), (33, 32), (65, 6)]);
        // A record of half the byte limit: two do not fit in one chunk, and
        // one larger than the limit still gets a chunk of its own.
        let big = |id: u64, bytes: usize| {
            let mut e = ev(id, 0);
            e.cmdline = Some("x".repeat(bytes));
            e
        };
        let events = vec![
            big(1, CHUNK_MAX_RAW_BYTES / 2),
            big(2, CHUNK_MAX_RAW_BYTES / 2),
            ev(3, 0),
            big(4, CHUNK_MAX_RAW_BYTES * 2),
            ev(5, 0),
        ];
        assert_eq!(
            keys_and_counts(&events),
            vec![(1, 1), (2, 2), (4, 1), (5, 1)]
        );
        let all: Vec<u64> = encode(&events)
            .unwrap()
            .iter()
            .flat_map(|(_, v)| Chunk::open(v).unwrap().ids().collect::<Vec<_>>())
            .collect();
        assert_eq!(all, vec![1, 2, 3, 4, 5]);
    }
}
