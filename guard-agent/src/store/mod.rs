//! The event store: a sled database under the state directory, written in
//! batches by one writer task, read by `guard-agent events` (through the
//! admin socket while the agent runs, directly when it does not).
//!
//! Invariants: event ids are increasing and never reused (sled's id
//! generator); each write batch's events are stored as compressed chunks
//! ([`chunk`]) keyed by their first id, and the ids of two chunks never
//! interleave, so key order is id order and one range lookup finds an id;
//! a clean stop drains the queue and flushes before it returns; retention
//! removes the oldest chunks first, by age and by stored size.
//! The store must never receive unmasked content: it stores [`Event`]s as
//! they are given and derives nothing from payloads.

pub mod chunk;
pub mod event;
pub mod filter;

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use time::OffsetDateTime;
use tokio::sync::{broadcast, mpsc};

pub use event::{
    AdminRecord, DnsRecord, Event, EventKind, FindingRecord, HttpRecord, PolicyRecord, TlsRecord,
    Verdict,
};
pub use filter::EventFilter;

use crate::config::Retention;
use chunk::Chunk;

/// How many events one write batch holds at most.
const BATCH_MAX: usize = 512;
/// How long the writer lets events accumulate before a write.
const BATCH_WINDOW: Duration = Duration::from_millis(20);
/// sled's page cache. sled's default (1 GiB) let the agent's RSS grow with
/// the store: 325 MiB after a 60 000-request bench with one value per
/// event. Writes touch only the newest leaf; reads are the CLI's. sled
/// counts its pages smaller than they are in memory: at 32 MiB the agent
/// still peaked at 127 MiB after 200 000 keep-alive requests, at 8 MiB at
/// 90 MiB, with no change in CPU per request beyond the noise.
const CACHE_BYTES: u64 = 8 << 20;
/// How often written events are flushed to disk (by sled, and by the
/// writer, which learns of a failed flush that way).
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// The tree of chunks.
const CHUNKS_TREE: &str = "event_chunks";
/// The tree of stores written before chunks: one JSON value per event,
/// keyed by id. Moved into chunks at open.
const PER_EVENT_TREE: &str = "events";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("event store {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: sled::Error,
    },
    #[error("event store: {0}")]
    Sled(#[from] sled::Error),
    #[error("event store: a record could not be decoded: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("event store: a stored chunk is damaged: {0}")]
    Corrupt(String),
}

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct EventStore {
    db: sled::Db,
    chunks: sled::Tree,
    /// Stored size of the chunks (keys + values), for retention.
    bytes: Arc<AtomicU64>,
    /// Number of stored events.
    count: Arc<AtomicU64>,
    /// Events written since the store was opened (never goes down).
    written: Arc<AtomicU64>,
    /// Held while ids are handed out, so that a write batch's fresh ids are
    /// one contiguous run that no reserved id falls into.
    ids: Arc<Mutex<()>>,
    /// Events the writer could not store (a full disk), and why.
    lost: Arc<Mutex<LostLog>>,
}

#[derive(Default)]
struct LostLog {
    events: LostEvents,
    /// The failure last written to the log.
    logged: Option<(OffsetDateTime, String)>,
}

/// Events the writer could not store since the agent started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LostEvents {
    pub count: u64,
    /// When the last write failed, and the error.
    pub last: Option<(OffsetDateTime, String)>,
}

fn key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

impl EventStore {
    /// Opens (or creates) the store at `path`, moving events of the
    /// one-value-per-event layout into chunks. Fails if another process
    /// holds it open.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            .flush_every_ms(Some(FLUSH_EVERY.as_millis() as u64))
            .open()
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let chunks = db.open_tree(CHUNKS_TREE)?;
        let moved = move_per_event_records(&db, &chunks)?;
        if moved > 0 {
            tracing::info!("event store: moved {moved} events into compressed chunks");
        }
        let (mut bytes, mut count) = (0u64, 0u64);
        for kv in chunks.iter() {
            let (k, v) = kv?;
            bytes += (k.len() + v.len()) as u64;
            count += u64::from(chunk::header(&v)?.count);
        }
        Ok(Self {
            db,
            chunks,
            bytes: Arc::new(AtomicU64::new(bytes)),
            count: Arc::new(AtomicU64::new(count)),
            written: Arc::new(AtomicU64::new(0)),
            ids: Arc::new(Mutex::new(())),
            lost: Arc::new(Mutex::new(LostLog::default())),
        })
    }

    /// Writes a batch of events, assigning ids to those without one. The
    /// fresh ones share chunks; an event whose id was reserved earlier
    /// gets a chunk of its own (its id lies before the fresh run).
    pub fn write_batch(&self, events: &mut [Event]) -> Result<(), StoreError> {
        // Reserved ids were handed out before this run: all lie below it.
        let mut first_fresh = u64::MAX;
        {
            let _run = self.ids.lock().unwrap_or_else(|p| p.into_inner());
            for e in events.iter_mut().filter(|e| e.id == 0) {
                e.id = self.db.generate_id()? + 1;
                first_fresh = first_fresh.min(e.id);
            }
        }
        let mut values = chunk::encode(events.iter().filter(|e| e.id >= first_fresh))?;
        for e in events.iter().filter(|e| e.id < first_fresh) {
            values.extend(chunk::encode(std::iter::once(e))?);
        }
        let added = insert_chunks(&self.chunks, values)?;
        self.bytes.fetch_add(added, Ordering::Relaxed);
        self.count.fetch_add(events.len() as u64, Ordering::Relaxed);
        self.written
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// A fresh event id (increasing, never reused, survives restarts), for
    /// a caller that must name an event before it is written (a 403 body).
    pub fn next_id(&self) -> Result<u64, StoreError> {
        let _run = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self.db.generate_id()? + 1)
    }

    /// The key and value of the chunk that holds `id` if any does.
    fn chunk_for(&self, id: u64) -> Result<Option<(sled::IVec, sled::IVec)>, StoreError> {
        Ok(self.chunks.range(..=key(id)).next_back().transpose()?)
    }

    /// One event by id.
    pub fn get(&self, id: u64) -> Result<Option<Event>, StoreError> {
        match self.chunk_for(id)? {
            Some((_, v)) => Chunk::open(&v)?.find(id),
            None => Ok(None),
        }
    }

    /// Matching events, oldest first; with a limit, the most recent `limit`.
    pub fn query(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError> {
        if let Some(id) = filter.id {
            // Keyed by id: no scan.
            return Ok(self
                .get(id)?
                .into_iter()
                .filter(|e| filter.matches(e))
                .collect());
        }
        let mut out = Vec::new();
        let limit = filter.limit.unwrap_or(usize::MAX);
        // Ids follow recording order and events are recorded at most a
        // connection's lifetime after they start; keep scanning a little
        // past `since` rather than stopping at the first older chunk.
        let horizon = filter
            .since
            .map(|since| (since - time::Duration::days(1)).unix_timestamp_nanos());
        'chunks: for kv in self.chunks.iter().rev() {
            let (_, v) = kv?;
            if let Some(h) = horizon {
                if i128::from(chunk::header(&v)?.newest_ts_nanos) < h {
                    break;
                }
            }
            for e in Chunk::open(&v)?.events()?.into_iter().rev() {
                if filter.matches(&e) {
                    out.push(e);
                    if out.len() >= limit {
                        break 'chunks;
                    }
                }
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Events recorded after `id` (greater ids), oldest first.
    pub fn after(&self, id: u64) -> Result<Vec<Event>, StoreError> {
        let from = match self.chunk_for(id)? {
            Some((k, _)) => first_id(&k)?,
            None => 0,
        };
        let mut out = Vec::new();
        for kv in self.chunks.range(key(from)..) {
            let (_, v) = kv?;
            out.extend(Chunk::open(&v)?.events()?.into_iter().filter(|e| e.id > id));
        }
        Ok(out)
    }

    /// Every chunk decompressed (records and index), oldest first: what a
    /// search of the store for secrets must read, since a scan of the
    /// files sees only compressed bytes.
    pub fn decompressed_chunks(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.chunks
            .iter()
            .map(|kv| Ok(Chunk::open(&kv?.1)?.into_raw()))
            .collect()
    }

    /// Number of stored events.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Events written since the store was opened: a measure of activity
    /// that retention does not lower.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Events that could not be written since the store was opened.
    pub fn lost(&self) -> LostEvents {
        self.lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .events
            .clone()
    }

    /// Counts `n` events a failed write lost. Returns whether to log it:
    /// the first failure, a different error, or a minute since the last
    /// log line (a full disk fails every batch, 50 times a second).
    fn note_lost(&self, n: usize, error: &str, now: OffsetDateTime) -> bool {
        let mut l = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        l.events.count += n as u64;
        l.events.last = Some((now, error.to_owned()));
        let log = match &l.logged {
            None => true,
            Some((at, e)) => e != error || now - *at >= time::Duration::minutes(1),
        };
        if log {
            l.logged = Some((now, error.to_owned()));
        }
        log
    }

    /// Stored size of the events in bytes (compressed chunks and keys).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Size of the database on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Removes the oldest chunks while their newest event is older than
    /// `max_age`, then while the store is over `max_bytes`. Returns how
    /// many events were removed.
    pub fn apply_retention(&self, r: &Retention, now: OffsetDateTime) -> Result<usize, StoreError> {
        let cutoff = (now - r.max_age).unix_timestamp_nanos();
        let mut removed = 0;
        for kv in self.chunks.iter() {
            let (k, v) = kv?;
            let h = chunk::header(&v)?;
            let too_old = i128::from(h.newest_ts_nanos) < cutoff;
            let too_big = self.bytes() > r.max_bytes;
            if !too_old && !too_big {
                break;
            }
            self.chunks.remove(&k)?;
            self.bytes
                .fetch_sub((k.len() + v.len()) as u64, Ordering::Relaxed);
            self.count.fetch_sub(u64::from(h.count), Ordering::Relaxed);
            removed += h.count as usize;
        }
        Ok(removed)
    }

    /// Flushes everything to disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

/// Bytes an unprivileged writer may still use on the filesystem holding
/// `dir` (what `df` shows as available); `None` when it cannot be asked.
pub fn disk_available(dir: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Inserts encoded chunks in one sled batch; returns their stored size.
fn insert_chunks(tree: &sled::Tree, chunks: Vec<(u64, Vec<u8>)>) -> Result<u64, StoreError> {
    let mut batch = sled::Batch::default();
    let mut bytes = 0u64;
    for (first, value) in chunks {
        bytes += (8 + value.len()) as u64;
        batch.insert(&key(first), value);
    }
    tree.apply_batch(batch)?;
    Ok(bytes)
}

fn first_id(k: &[u8]) -> Result<u64, StoreError> {
    let b: [u8; 8] = k
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("a chunk key of {} bytes", k.len())))?;
    Ok(u64::from_be_bytes(b))
}

/// Moves the events of a store written one value per event (before
/// chunks) into chunks, then drops the old tree. Chunks are cut from runs
/// of consecutive keys, so their ids never interleave; a move cut short by
/// a crash is redone whole at the next open (same keys, same values).
fn move_per_event_records(db: &sled::Db, chunks: &sled::Tree) -> Result<usize, StoreError> {
    if !db
        .tree_names()
        .iter()
        .any(|n| n.as_ref() == PER_EVENT_TREE.as_bytes())
    {
        return Ok(0);
    }
    let old = db.open_tree(PER_EVENT_TREE)?;
    let mut moved = 0;
    let mut run = Vec::with_capacity(BATCH_MAX);
    let mut write = |run: &mut Vec<Event>| -> Result<(), StoreError> {
        insert_chunks(chunks, chunk::encode(run.iter())?)?;
        moved += run.len();
        run.clear();
        Ok(())
    };
    for kv in old.iter() {
        let (k, v) = kv?;
        let mut e: Event = serde_json::from_slice(&v)?;
        e.id = first_id(&k)?;
        run.push(e);
        if run.len() == BATCH_MAX {
            write(&mut run)?;
        }
    }
    write(&mut run)?;
    db.flush()?;
    db.drop_tree(PER_EVENT_TREE)?;
    Ok(moved)
}

/// Counts `n` events that did not reach the disk, and logs it (at most
/// once a minute for the same error).
fn report_lost(store: &EventStore, n: usize, what: &str, e: &StoreError) {
    let error = e.to_string();
    if store.note_lost(n, &error, OffsetDateTime::now_utc()) {
        tracing::error!(
            lost = store.lost().count,
            "{what}, {n} events did not reach the disk: {error}"
        );
    }
}

/// Where the data path sends events: a bounded queue to the writer task.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<Event>,
    store: EventStore,
}

impl EventSink {
    /// Queues an event; waits if the writer is behind (back-pressure rather
    /// than loss).
    pub async fn record(&self, e: Event) {
        if self.tx.send(e).await.is_err() {
            tracing::error!("event writer is gone; an event was lost");
        }
    }

    /// Queues an event from synchronous code (a body's end callback):
    /// straight into the queue when it has room, else by a task that waits
    /// for room. Not spawning in the common case keeps a task (and the
    /// wake-up of an idle runtime thread to run it) off every request.
    pub fn record_soon(&self, e: Event) {
        match self.tx.try_send(e) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(e)) => {
                let sink = self.clone();
                tokio::spawn(async move { sink.record(e).await });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("event writer is gone; an event was lost");
            }
        }
    }

    /// Reserves an event id ahead of recording (see [`EventStore::next_id`]).
    pub fn reserve_id(&self) -> u64 {
        self.store.next_id().unwrap_or(0)
    }
}

/// The writer task's handle: stored events are broadcast to followers.
pub struct EventWriter {
    pub sink: EventSink,
    pub stored: broadcast::Sender<Arc<Event>>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the writer task. It ends, after writing and flushing everything
/// queued, once every [`EventSink`] clone is dropped.
pub fn start_writer(store: EventStore, retention: Retention) -> EventWriter {
    let (tx, mut rx) = mpsc::channel::<Event>(8192);
    let sink = EventSink {
        tx,
        store: store.clone(),
    };
    let (stored, _) = broadcast::channel(4096);
    let out = stored.clone();
    let task = tokio::spawn(async move {
        let mut retention_tick = tokio::time::interval(Duration::from_secs(60));
        // sled reports an I/O error of its own background writes only to
        // the next caller: flushing here, as often as sled flushes by
        // itself, tells which events did not reach the disk.
        let mut flush_tick = tokio::time::interval(FLUSH_EVERY);
        flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unflushed = 0usize;
        let mut buf = Vec::with_capacity(BATCH_MAX);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut buf, BATCH_MAX) => {
                    if n == 0 { break; }
                    // Let a burst accumulate: one write (and one wake-up of
                    // this task) per window instead of one per event keeps
                    // the store off the data path's CPU under load.
                    if n < BATCH_MAX {
                        tokio::time::sleep(BATCH_WINDOW).await;
                        while buf.len() < BATCH_MAX {
                            match rx.try_recv() {
                                Ok(e) => buf.push(e),
                                Err(_) => break,
                            }
                        }
                    }
                    let s = store.clone();
                    let mut batch = std::mem::take(&mut buf);
                    let batch_len = batch.len();
                    let res = tokio::task::spawn_blocking(move || s.write_batch(&mut batch).map(|_| batch)).await;
                    match res {
                        Ok(Ok(batch)) => {
                            unflushed += batch.len();
                            for e in batch { let _ = out.send(Arc::new(e)); }
                        }
                        Ok(Err(e)) => report_lost(&store, batch_len, "writing events failed", &e),
                        Err(e) => tracing::error!("event writer panicked: {e}"),
                    }
                }
                _ = flush_tick.tick(), if unflushed > 0 => {
                    let s = store.clone();
                    let res = tokio::task::spawn_blocking(move || s.flush()).await;
                    if let Ok(Err(e)) = res {
                        report_lost(&store, unflushed, "flushing events failed", &e);
                    }
                    unflushed = 0;
                }
                _ = retention_tick.tick() => {
                    let s = store.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        match s.apply_retention(&retention, OffsetDateTime::now_utc()) {
                            Ok(0) => {}
                            Ok(n) => tracing::info!("retention removed {n} old events"),
                            Err(e) => tracing::warn!("retention failed: {e}"),
                        }
                    }).await;
                }
            }
        }
        if let Err(e) = tokio::task::spawn_blocking(move || store.flush())
            .await
            .unwrap_or(Ok(()))
        {
            tracing::error!("flushing the event store failed: {e}");
        }
    });
    EventWriter { sink, stored, task }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs_ago: i64) -> Event {
        Event::connection(OffsetDateTime::now_utc() - time::Duration::seconds(secs_ago))
    }

    /// Opens a store this process has just dropped. sled's I/O threads may
    /// still hold the file lock for a moment after the last handle goes
    /// (a new process never sees this: the lock dies with the old one).
    fn reopen(path: &Path) -> EventStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match EventStore::open(path) {
                Ok(s) => return s,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => panic!("reopening the store: {e}"),
            }
        }
    }

    #[test]
    fn lost_events_are_counted_and_logged_once_a_minute_per_error() {
        let dir = tempfile::tempdir().unwrap();
        let s = EventStore::open(dir.path()).unwrap();
        let t0 = OffsetDateTime::now_utc();
        let secs = time::Duration::seconds;
        assert_eq!(s.lost(), LostEvents::default());
        assert!(s.note_lost(3, "disk full", t0));
        assert!(!s.note_lost(2, "disk full", t0 + secs(10)));
        assert!(s.note_lost(1, "other", t0 + secs(20)));
        assert!(!s.note_lost(1, "other", t0 + secs(30)));
        assert!(s.note_lost(1, "other", t0 + secs(81)));
        assert_eq!(
            s.lost(),
            LostEvents {
                count: 8,
                last: Some((t0 + secs(81), "other".to_owned())),
            }
        );
    }

    #[test]
    fn events_survive_a_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = EventStore::open(dir.path()).unwrap();
            let mut b = vec![at(3), at(2), at(1)];
            s.write_batch(&mut b).unwrap();
            assert!(b[0].id < b[1].id && b[1].id < b[2].id);
            s.flush().unwrap();
        }
        let s = reopen(dir.path());
        let all = s.query(&EventFilter::default()).unwrap();
        assert_eq!(all.len(), 3);
        assert!(all.windows(2).all(|w| w[0].id < w[1].id));
        let last = s
            .query(&EventFilter {
                limit: Some(2),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(last.len(), 2);
        assert_eq!(last[1].id, all[2].id);
        assert_eq!(s.after(all[0].id).unwrap().len(), 2);
        assert_eq!(s.get(all[1].id).unwrap().unwrap().id, all[1].id);
        assert!(s.get(all[2].id + 100).unwrap().is_none());
        let one = s
            .query(&EventFilter {
                id: Some(all[0].id),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].id, all[0].id);
    }

    #[test]
    fn retention_drops_old_then_oversize() {
        let dir = tempfile::tempdir().unwrap();
        let s = EventStore::open(dir.path()).unwrap();
        // Three batches, three chunks: retention removes whole chunks.
        for mut b in [vec![at(7200)], vec![at(10)], vec![at(5), at(1)]] {
            s.write_batch(&mut b).unwrap();
        }
        let r = Retention {
            max_age: Duration::from_secs(3600),
            max_bytes: u64::MAX,
        };
        assert_eq!(s.apply_retention(&r, OffsetDateTime::now_utc()).unwrap(), 1);
        // One byte over the limit: exactly the oldest chunk has to go.
        let r = Retention {
            max_age: Duration::from_secs(3600),
            max_bytes: s.bytes() - 1,
        };
        assert_eq!(s.apply_retention(&r, OffsetDateTime::now_utc()).unwrap(), 1);
        assert_eq!(s.len(), 2);
        // The activity count is what was written, whatever retention removed.
        assert_eq!(s.written(), 4);
    }

    #[test]
    fn reserved_ids_and_long_batches_are_all_found() {
        let dir = tempfile::tempdir().unwrap();
        let s = EventStore::open(dir.path()).unwrap();
        // A request names its event (a 403 body) before it is written; in
        // between, other batches are written.
        let reserved = s.next_id().unwrap();
        let mut first: Vec<Event> = (0..100).map(|_| at(1)).collect();
        s.write_batch(&mut first).unwrap();
        let mut late = at(2);
        late.id = reserved;
        let mut second = vec![at(0), late, at(0)];
        s.write_batch(&mut second).unwrap();
        assert_eq!(s.len(), 103);
        let mut ids: Vec<u64> = first.iter().chain(&second).map(|e| e.id).collect();
        for &id in &ids {
            assert_eq!(s.get(id).unwrap().map(|e| e.id), Some(id), "id {id}");
        }
        ids.sort();
        let all: Vec<u64> = s
            .query(&EventFilter::default())
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(all, ids, "every event once, in id order");
        let after: Vec<u64> = s.after(ids[50]).unwrap().iter().map(|e| e.id).collect();
        assert_eq!(after, ids[51..]);
        assert_eq!(s.after(0).unwrap().len(), 103);
        assert!(s.after(ids[102]).unwrap().is_empty());
        let last = s
            .query(&EventFilter {
                limit: Some(40),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(last.first().map(|e| e.id), Some(ids[63]));
        assert!(s.get(0).unwrap().is_none());
        assert!(s.get(ids[102] + 1).unwrap().is_none());
    }

    #[test]
    fn since_skips_old_chunks_and_keeps_what_matches() {
        let dir = tempfile::tempdir().unwrap();
        let s = EventStore::open(dir.path()).unwrap();
        let day = 86_400;
        for mut b in [vec![at(10 * day)], vec![at(3 * day)], vec![at(60), at(5)]] {
            s.write_batch(&mut b).unwrap();
        }
        let since = |secs_ago: i64| EventFilter {
            since: Some(OffsetDateTime::now_utc() - time::Duration::seconds(secs_ago)),
            ..Default::default()
        };
        assert_eq!(s.query(&since(30)).unwrap().len(), 1);
        assert_eq!(s.query(&since(4 * day)).unwrap().len(), 3);
    }

    #[test]
    fn counts_and_sizes_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (len, bytes) = {
            let s = EventStore::open(dir.path()).unwrap();
            let mut b: Vec<Event> = (0..70).map(|_| at(1)).collect();
            s.write_batch(&mut b).unwrap();
            s.flush().unwrap();
            (s.len(), s.bytes())
        };
        assert_eq!(len, 70);
        let s = reopen(dir.path());
        assert_eq!((s.len(), s.bytes()), (len, bytes));
    }

    #[test]
    fn a_store_of_one_value_per_event_is_moved_into_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let mut old: Vec<Event> = (0..600).map(|i| at(600 - i)).collect();
        {
            // The layout before chunks: JSON per event, keyed by id.
            let db = sled::open(dir.path()).unwrap();
            let t = db.open_tree(PER_EVENT_TREE).unwrap();
            for e in &mut old {
                e.id = db.generate_id().unwrap() + 1;
                t.insert(key(e.id), serde_json::to_vec(e).unwrap()).unwrap();
            }
            db.flush().unwrap();
        }
        let s = reopen(dir.path());
        assert_eq!(s.len(), 600);
        let all = s.query(&EventFilter::default()).unwrap();
        let ids = |v: &[Event]| v.iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(ids(&all), ids(&old));
        assert_eq!(s.get(old[321].id).unwrap().unwrap().ts, old[321].ts);
        assert!(!s
            .db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == PER_EVENT_TREE.as_bytes()));
        // New ids continue after the old ones.
        let mut b = vec![at(0)];
        s.write_batch(&mut b).unwrap();
        assert!(b[0].id > old[599].id);
        drop(s);
        assert_eq!(reopen(dir.path()).len(), 601);
    }

    #[tokio::test]
    async fn the_writer_flushes_everything_when_the_sinks_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let s = EventStore::open(dir.path()).unwrap();
        let w = start_writer(s.clone(), Retention::default());
        for _ in 0..1000 {
            w.sink.record(at(0)).await;
        }
        drop(w.sink);
        w.task.await.unwrap();
        assert_eq!(s.len(), 1000);
    }
}
