//! Accepting redirected connections and handling each one: original
//! destination, attribution, upstream connect, splice, event.

use std::{
    io,
    net::{Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use guard_common::OriginalDst;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};

use super::{
    connect::{connect_tcp, describe_connect_error},
    splice::{splice, ByteCounts},
};
use crate::{
    bpf::OriginalDstTable,
    proc::ProcCache,
    store::{Event, EventSink, Verdict},
};

/// Live counters, reported by `guard-agent status`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Redirected connections accepted.
    pub redirected: AtomicU64,
    /// Connections open now.
    pub active: AtomicU64,
    /// Connections that ended in an error (upstream refused, reset, ...).
    pub errors: AtomicU64,
    /// Accepted connections with no original destination (not redirected).
    pub unknown: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct CounterSnapshot {
    pub redirected: u64,
    pub active: u64,
    pub errors: u64,
    pub unknown: u64,
}

impl Counters {
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            redirected: self.redirected.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            unknown: self.unknown.load(Ordering::Relaxed),
        }
    }
}

/// What every connection task needs.
pub struct Intercept {
    pub table: OriginalDstTable,
    pub procs: Arc<ProcCache>,
    pub sink: EventSink,
    pub counters: Arc<Counters>,
    /// `SO_MARK` for upstream sockets, so the kernel programs skip them.
    pub mark: u32,
}

/// The destination as the application asked for it (IPv4 unmapped).
pub fn original_addr(o: &OriginalDst) -> SocketAddr {
    let ip = Ipv6Addr::from(o.dst.addr).to_canonical();
    SocketAddr::new(ip, o.dst.port)
}

fn comm_str(comm: &[u8]) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Accepts connections until `shutdown` turns true; every connection runs in
/// its own task, which gets a clone of `shutdown` to stop copying when the
/// agent stops.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<Intercept>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            res = listener.accept() => match res {
                Ok((stream, peer)) => {
                    let ctx = Arc::clone(&ctx);
                    let stop = shutdown.clone();
                    tokio::spawn(async move { handle(ctx, stream, peer, stop).await });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
}

/// Closes a client connection with a TCP reset.
fn reset(stream: TcpStream) {
    // Linger 0 on a non-blocking socket: close sends RST at once, nothing blocks.
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Looks the original destination up; the kernel publishes it before the
/// accept completes, a few retries cover scheduling delays.
async fn original_destination(table: &OriginalDstTable, peer: SocketAddr) -> Option<OriginalDst> {
    for attempt in 0..3 {
        if let Some(o) = table.take(peer) {
            return Some(o);
        }
        tokio::time::sleep(Duration::from_millis(1 << attempt)).await;
    }
    None
}

async fn handle(
    ctx: Arc<Intercept>,
    client: TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let mut ev = Event::connection(OffsetDateTime::now_utc());
    ev.src = Some(peer.to_string());

    let Some(orig) = original_destination(&ctx.table, peer).await else {
        ctx.counters.unknown.fetch_add(1, Ordering::Relaxed);
        ev.verdict = Verdict::Error;
        ev.error = Some(
            "no original destination: the connection was not redirected by Guard's kernel programs"
                .into(),
        );
        reset(client);
        finish(&ctx, ev, started).await;
        return;
    };
    ctx.counters.redirected.fetch_add(1, Ordering::Relaxed);
    ctx.counters.active.fetch_add(1, Ordering::Relaxed);
    let _ = client.set_nodelay(true);

    let dst = original_addr(&orig);
    ev.dst = Some(dst.to_string());
    ev.pid = Some(orig.tgid);
    ev.tid = Some(orig.pid);
    ev.uid = Some(orig.uid);
    ev.gid = Some(orig.gid);
    ev.cgroup_id = Some(orig.cgroup_id);
    ev.comm = Some(comm_str(&orig.comm));

    let procs = Arc::clone(&ctx.procs);
    let (info, upstream) = tokio::join!(procs.lookup(orig.tgid), connect_tcp(dst, ctx.mark));
    ev.user = ctx.procs.user_name(orig.uid);
    ev.exe = info.exe.clone();
    ev.cmdline = info.cmdline.clone();
    ev.ancestors = info.ancestors.clone();
    ev.cgroup = info.cgroup.clone();
    ev.unit = info.unit.clone();

    match upstream {
        Err(e) => {
            ev.verdict = Verdict::Error;
            ev.error = Some(describe_connect_error(&e));
            ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
            reset(client);
        }
        Ok(up) => {
            let counts = ByteCounts::default();
            let outcome = tokio::select! {
                r = splice(client, up, &counts) => r.err().map(|e| format!("connection ended with an error: {e}")),
                _ = crate::shutdown::stopped(&mut stop) => Some("agent stopped while the connection was open".to_owned()),
            };
            ev.bytes_out = counts.out.load(Ordering::Relaxed);
            ev.bytes_in = counts.inbound.load(Ordering::Relaxed);
            if let Some(err) = outcome {
                ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
                ev.error = Some(err);
            }
        }
    }
    ctx.counters.active.fetch_sub(1, Ordering::Relaxed);
    finish(&ctx, ev, started).await;
}

async fn finish(ctx: &Intercept, mut ev: Event, started: Instant) {
    let elapsed = started.elapsed();
    ev.closed_at = Some(ev.ts + elapsed);
    ev.duration_ms = Some(elapsed.as_secs_f64() * 1000.0);
    ctx.sink.record(ev).await;
}
