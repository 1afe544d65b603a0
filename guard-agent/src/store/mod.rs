//! The event store: a sled database under the state directory, written in
//! batches by one writer task, read by `guard-agent events` (through the
//! admin socket while the agent runs, directly when it does not).
//!
//! Invariants: events are keyed by a big-endian, increasing id, so key order
//! is recording order; a clean stop drains the queue and flushes before it
//! returns; retention removes the oldest events first, by age and by size.
//! The store must never receive unmasked content: it stores [`Event`]s as
//! they are given and derives nothing from payloads.

pub mod event;
pub mod filter;

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
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

/// How many events one write batch holds at most.
const BATCH_MAX: usize = 512;
/// How long the writer lets events accumulate before a write.
const BATCH_WINDOW: Duration = Duration::from_millis(20);

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
}

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct EventStore {
    db: sled::Db,
    events: sled::Tree,
    /// Logical size of the events tree (keys + values), for retention.
    bytes: Arc<AtomicU64>,
}

impl EventStore {
    /// Opens (or creates) the store at `path`. Fails if another process
    /// holds it open.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(Some(1000))
            .open()
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let events = db.open_tree("events")?;
        let mut bytes = 0u64;
        for kv in events.iter() {
            let (k, v) = kv?;
            bytes += (k.len() + v.len()) as u64;
        }
        Ok(Self {
            db,
            events,
            bytes: Arc::new(AtomicU64::new(bytes)),
        })
    }

    /// Writes a batch of events, assigning their ids.
    pub fn write_batch(&self, events: &mut [Event]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let mut added = 0u64;
        for e in events.iter_mut() {
            if e.id == 0 {
                e.id = self.next_id()?;
            }
            let value = serde_json::to_vec(e)?;
            added += (8 + value.len()) as u64;
            batch.insert(&e.id.to_be_bytes(), value);
        }
        self.events.apply_batch(batch)?;
        self.bytes.fetch_add(added, Ordering::Relaxed);
        Ok(())
    }

    /// A fresh event id (increasing, never reused, survives restarts), for
    /// a caller that must name an event before it is written (a 403 body).
    pub fn next_id(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()? + 1)
    }

    /// One event by id.
    pub fn get(&self, id: u64) -> Result<Option<Event>, StoreError> {
        match self.events.get(id.to_be_bytes())? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
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
        for kv in self.events.iter().rev() {
            let (_, v) = kv?;
            let e: Event = serde_json::from_slice(&v)?;
            if let Some(since) = filter.since {
                // Ids follow recording order and events are recorded at most
                // a connection's lifetime after they start; keep scanning
                // a little past `since` rather than stopping at the first.
                if e.ts < since - time::Duration::days(1) {
                    break;
                }
            }
            if filter.matches(&e) {
                out.push(e);
                if out.len() >= limit {
                    break;
                }
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Events recorded after `id`, oldest first.
    pub fn after(&self, id: u64) -> Result<Vec<Event>, StoreError> {
        let start = (id + 1).to_be_bytes();
        self.events
            .range(start..)
            .map(|kv| Ok(serde_json::from_slice(&kv?.1)?))
            .collect()
    }

    /// Number of stored events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Logical size of the stored events in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Size of the database on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Removes events older than `max_age`, then the oldest until the store
    /// is under `max_bytes`. Returns how many were removed.
    pub fn apply_retention(&self, r: &Retention, now: OffsetDateTime) -> Result<usize, StoreError> {
        let cutoff = now - r.max_age;
        let mut removed = 0;
        for kv in self.events.iter() {
            let (k, v) = kv?;
            let e: Event = serde_json::from_slice(&v)?;
            let too_old = e.ts < cutoff;
            let too_big = self.bytes() > r.max_bytes;
            if !too_old && !too_big {
                break;
            }
            self.events.remove(&k)?;
            self.bytes
                .fetch_sub((k.len() + v.len()) as u64, Ordering::Relaxed);
            removed += 1;
        }
        Ok(removed)
    }

    /// Flushes everything to disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
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
                    let res = tokio::task::spawn_blocking(move || s.write_batch(&mut batch).map(|_| batch)).await;
                    match res {
                        Ok(Ok(batch)) => for e in batch { let _ = out.send(Arc::new(e)); },
                        Ok(Err(e)) => tracing::error!("writing events failed: {e}"),
                        Err(e) => tracing::error!("event writer panicked: {e}"),
                    }
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
        let mut b = vec![at(7200), at(10), at(5), at(1)];
        s.write_batch(&mut b).unwrap();
        let r = Retention {
            max_age: Duration::from_secs(3600),
            max_bytes: u64::MAX,
        };
        assert_eq!(s.apply_retention(&r, OffsetDateTime::now_utc()).unwrap(), 1);
        // One byte over the limit: exactly the oldest event has to go.
        let r = Retention {
            max_age: Duration::from_secs(3600),
            max_bytes: s.bytes() - 1,
        };
        assert_eq!(s.apply_retention(&r, OffsetDateTime::now_utc()).unwrap(), 1);
        assert_eq!(s.len(), 2);
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
