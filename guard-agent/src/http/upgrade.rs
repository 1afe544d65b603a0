//! Upgraded sessions (WebSocket after its HTTP/1.1 handshake): carried both
//! ways as opaque bytes, counted, and the exchange's event recorded when the
//! session ends, with its duration and bytes each way.
//!
//! Nothing here reads or keeps the session's content; only byte counts
//! reach the event.

use std::{
    io,
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use time::OffsetDateTime;

use crate::{
    intercept::splice::{ByteCounts, CountingIo},
    store::{Event, EventSink},
};

/// Carries an upgraded connection both ways until either side closes, then
/// records the exchange's event (received on `event` once the 101 response
/// has gone out) with the session's duration and bytes: client → upstream
/// as out, upstream → client as in. A peer that closes without a TLS
/// close_notify ends the session normally; other I/O errors are recorded.
/// When `stopped`'s sender goes away (the connection's task was dropped:
/// the agent stops) the session ends and its event says so.
pub async fn carry(
    client_side: OnUpgrade,
    upstream_side: OnUpgrade,
    event: tokio::sync::oneshot::Receiver<Event>,
    sink: EventSink,
    started: Instant,
    mut stopped: tokio::sync::watch::Receiver<()>,
) {
    let (c, u) = tokio::join!(client_side, upstream_side);
    let session_start = Instant::now();
    // Read from the client: out; written to it: in.
    let counts = Arc::new(ByteCounts::default());
    let error = match (c, u) {
        (Ok(c), Ok(u)) => {
            let mut client = CountingIo::new(TokioIo::new(c), Arc::clone(&counts));
            let mut upstream = TokioIo::new(u);
            tokio::select! {
                r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match r {
                    Ok(_) => None,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => None,
                    Err(e) => Some(format!("upgraded session ended with an error: {e}")),
                },
                _ = stopped.changed() => {
                    Some("agent stopped while the upgraded session was open".to_owned())
                }
            }
        }
        (Err(e), _) => Some(format!("the client side of the upgrade failed: {e}")),
        (_, Err(e)) => Some(format!("the upstream side of the upgrade failed: {e}")),
    };
    let Ok(mut ev) = event.await else { return };
    if let Some(h) = ev.http.as_mut() {
        h.upgrade_ms = Some(session_start.elapsed().as_secs_f64() * 1000.0);
        h.upgrade_bytes_out = counts.out.load(Ordering::Relaxed);
        h.upgrade_bytes_in = counts.inbound.load(Ordering::Relaxed);
    }
    if let Some(e) = error {
        ev.error.get_or_insert(e);
    }
    ev.closed_at = Some(OffsetDateTime::now_utc());
    ev.duration_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
    sink.record(ev).await;
}
