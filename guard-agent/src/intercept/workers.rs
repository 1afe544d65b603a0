//! The threads the intercept path runs on: one current-thread tokio runtime
//! per thread, each with listening sockets of its own, bound to the agent's
//! listen addresses as one `SO_REUSEPORT` group per address. The kernel
//! hands every redirected connection to one thread's socket, and that
//! thread accepts it, attributes it, inspects or splices it and records it,
//! start to end.
//!
//! Why not the agent's shared work-stealing runtime: there, the worker that
//! saw a connection woke another worker to run its task, and every step of
//! the connect path could hop threads again. A wake-up costs tens of
//! microseconds on small VMs, and the connect path paid several per
//! connection (README, Benchmarks).
//!
//! The kernel picks a thread by a hash of the connection's addresses, so a
//! few long connections can land on one thread while another idles. At
//! accept, a thread that has more open connections than the least loaded
//! one hands the new connection over to it (one wake-up, once per
//! connection); with equal loads, as for sequential connections, it keeps
//! it.
//!
//! What this module must never do: share one listening socket between
//! threads (each would wake for every connection), or move a connection
//! between threads once it is being served. Everything else the agent runs
//! (admin socket, store writer, DNS over UDP, metrics) stays on the main
//! runtime.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::Poll,
    thread,
    time::Duration,
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
};

use super::listener::{self, Intercept};

/// Backlog of each listening socket (tokio's default).
const BACKLOG: i32 = 1024;

/// One listening socket for `addr` in its `SO_REUSEPORT` group.
fn bind_member(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SockAddr::from(addr))?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// `n` listening sockets on `addr`, one per intercept thread.
///
/// A plain socket (no `SO_REUSEPORT`) is bound first and closed again: a
/// reuse-port group would otherwise admit another root process listening
/// on the same port with `SO_REUSEPORT` (a second agent), and the two would
/// share connections silently instead of failing with "address in use".
pub fn bind_group(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    probe.bind(&SockAddr::from(addr))?;
    probe.listen(1)?;
    let addr = probe
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("listening socket without an IP address"))?;
    drop(probe);
    (0..n.max(1)).map(|_| bind_member(addr)).collect()
}

/// A connection handed from the thread that accepted it to another, already
/// counted there.
type Handoff = (std::net::TcpStream, SocketAddr, Counted);

/// Open connections per thread, and the way to hand one to a thread.
struct Placement {
    loads: Vec<AtomicUsize>,
    handoff: Vec<mpsc::UnboundedSender<Handoff>>,
}

impl Placement {
    /// Where a connection accepted by thread `me` should run: the least
    /// loaded thread when it has fewer open connections than `me`, else
    /// `me`. Counts it there at once, so that the next decision sees it;
    /// the count goes with the connection and ends with it.
    fn place(self: &Arc<Self>, me: usize) -> Counted {
        let mine = self.loads[me].load(Ordering::Relaxed);
        let (least, load) = self
            .loads
            .iter()
            .enumerate()
            .map(|(i, l)| (i, l.load(Ordering::Relaxed)))
            .min_by_key(|(_, l)| *l)
            .unwrap_or((me, mine));
        let to = if load < mine { least } else { me };
        self.loads[to].fetch_add(1, Ordering::Relaxed);
        Counted(Arc::clone(self), to)
    }
}

/// A connection counted on thread `.1`; uncounted when dropped (its task
/// ended, or it was lost on the way).
struct Counted(Arc<Placement>, usize);

impl Counted {
    /// The same connection, counted on thread `to` instead.
    fn move_to(self, to: usize) -> Counted {
        self.0.loads[to].fetch_add(1, Ordering::Relaxed);
        Counted(Arc::clone(&self.0), to)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.loads[self.1].fetch_sub(1, Ordering::Relaxed);
    }
}

/// The running intercept threads.
pub struct Workers {
    close: watch::Sender<bool>,
    done: Vec<oneshot::Receiver<()>>,
}

impl Workers {
    /// Starts one thread per entry of `listeners` (each entry: that
    /// thread's sockets, one per listen address). Connections watch `stop`
    /// and end when it turns true.
    pub fn start(
        listeners: Vec<Vec<std::net::TcpListener>>,
        ctx: Arc<Intercept>,
        stop: watch::Receiver<bool>,
    ) -> io::Result<Self> {
        let (close, close_rx) = watch::channel(false);
        let (senders, receivers): (Vec<_>, Vec<_>) =
            listeners.iter().map(|_| mpsc::unbounded_channel()).unzip();
        let placement = Arc::new(Placement {
            loads: listeners.iter().map(|_| AtomicUsize::new(0)).collect(),
            handoff: senders,
        });
        let mut done = Vec::new();
        for (me, (socks, handed)) in listeners.into_iter().zip(receivers).enumerate() {
            // Built here so that a failure stops the start-up.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (done_tx, done_rx) = oneshot::channel();
            let thread = Thread {
                me,
                placement: Arc::clone(&placement),
                ctx: Arc::clone(&ctx),
                stop: stop.clone(),
            };
            let close_rx = close_rx.clone();
            thread::Builder::new()
                .name(format!("guard-intercept-{me}"))
                .spawn(move || {
                    rt.block_on(thread.serve(socks, handed, close_rx));
                    let _ = done_tx.send(());
                })?;
            done.push(done_rx);
        }
        Ok(Self { close, done })
    }

    /// Stops accepting; open connections go on (handover, shutdown).
    pub fn close_listeners(&self) {
        let _ = self.close.send(true);
    }

    /// Closes the listeners and waits until every thread's connections
    /// have ended (they end on their own, or when `stop` turns true).
    pub async fn join(self) {
        self.close_listeners();
        for d in self.done {
            let _ = d.await;
        }
    }
}

/// One intercept thread.
struct Thread {
    me: usize,
    placement: Arc<Placement>,
    ctx: Arc<Intercept>,
    stop: watch::Receiver<bool>,
}

impl Thread {
    /// Accepts on this thread's sockets and takes connections handed over
    /// by other threads until `close` turns true, then waits until its
    /// connections have ended.
    async fn serve(
        self,
        socks: Vec<std::net::TcpListener>,
        mut handed: mpsc::UnboundedReceiver<Handoff>,
        mut close: watch::Receiver<bool>,
    ) {
        let listeners: Vec<TcpListener> = socks
            .into_iter()
            .filter_map(|s| {
                TcpListener::from_std(s)
                    .map_err(|e| tracing::error!("cannot serve a listening socket: {e}"))
                    .ok()
            })
            .collect();
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                res = accept_any(&listeners) => match res {
                    Ok((stream, peer)) => self.dispatch(&mut conns, stream, peer),
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some((stream, peer, count)) = handed.recv() => self.run_handed(&mut conns, stream, peer, count),
                // Reap finished connections as they go.
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                _ = async { close.wait_for(|c| *c).await.map(|_| ()) } => break,
            }
        }
        drop(listeners);
        // Connections handed over just before the close are served too.
        handed.close();
        while let Some((stream, peer, count)) = handed.recv().await {
            self.run_handed(&mut conns, stream, peer, count);
        }
        while conns.join_next().await.is_some() {}
    }

    /// Serves an accepted connection here, or hands it to a thread with
    /// fewer open connections.
    fn dispatch(&self, conns: &mut JoinSet<()>, stream: TcpStream, peer: SocketAddr) {
        let count = self.placement.place(self.me);
        let to = count.1;
        if to == self.me {
            return self.run(conns, stream, peer, count);
        }
        match stream.into_std() {
            Ok(std) => {
                if let Err(mpsc::error::SendError((std, peer, count))) =
                    self.placement.handoff[to].send((std, peer, count))
                {
                    // That thread has closed: serve it here after all.
                    self.run_handed(conns, std, peer, count.move_to(self.me));
                }
            }
            Err(e) => tracing::warn!("cannot hand a connection over: {e}"),
        }
    }

    /// Serves a connection another thread accepted.
    fn run_handed(
        &self,
        conns: &mut JoinSet<()>,
        stream: std::net::TcpStream,
        peer: SocketAddr,
        count: Counted,
    ) {
        match TcpStream::from_std(stream) {
            Ok(stream) => self.run(conns, stream, peer, count),
            Err(e) => tracing::warn!("cannot take a handed-over connection: {e}"),
        }
    }

    fn run(&self, conns: &mut JoinSet<()>, stream: TcpStream, peer: SocketAddr, count: Counted) {
        let (ctx, stop) = (Arc::clone(&self.ctx), self.stop.clone());
        conns.spawn(async move {
            listener::handle(ctx, stream, peer, stop).await;
            drop(count);
        });
    }
}

/// The next connection on any of `listeners`.
fn accept_any(
    listeners: &[TcpListener],
) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + '_ {
    std::future::poll_fn(move |cx| {
        for l in listeners {
            if let Poll::Ready(r) = l.poll_accept(cx) {
                return Poll::Ready(r);
            }
        }
        Poll::Pending
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(loads: &[usize]) -> Arc<Placement> {
        Arc::new(Placement {
            loads: loads.iter().map(|l| AtomicUsize::new(*l)).collect(),
            handoff: loads.iter().map(|_| mpsc::unbounded_channel().0).collect(),
        })
    }

    #[test]
    fn a_connection_moves_only_to_a_thread_with_fewer_open_connections() {
        // Equal loads (sequential connections): stay, no hand-over.
        let p = placement(&[0, 0]);
        let first = p.place(0);
        assert_eq!(first.1, 0);
        // Four connections all hashed to thread 0 end up two and two.
        let rest: Vec<Counted> = (0..3).map(|_| p.place(0)).collect();
        assert_eq!(rest.iter().map(|c| c.1).collect::<Vec<_>>(), [1, 0, 1]);
        let loads: Vec<usize> = p.loads.iter().map(|l| l.load(Ordering::Relaxed)).collect();
        assert_eq!(loads, [2, 2]);
        // The least loaded of several.
        let p = placement(&[3, 2, 0, 1]);
        let placed = p.place(1);
        assert_eq!(placed.1, 2);
        assert_eq!(p.loads[2].load(Ordering::Relaxed), 1);
        // Ending a connection uncounts it where it ran.
        let p = placement(&[1, 0]);
        drop(Counted(Arc::clone(&p), 0));
        assert_eq!(p.loads[0].load(Ordering::Relaxed), 0);
        // Moving a count takes it from one thread to the other.
        let moved = p.place(0).move_to(1);
        assert_eq!(moved.1, 1);
        let loads: Vec<usize> = p.loads.iter().map(|l| l.load(Ordering::Relaxed)).collect();
        assert_eq!(loads, [0, 1]);
    }

    #[test]
    fn a_group_shares_one_port_and_refuses_a_second_group() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let addrs: Vec<SocketAddr> = group.iter().map(|l| l.local_addr().unwrap()).collect();
        assert_eq!(addrs.len(), 3);
        assert!(addrs.iter().all(|a| *a == addrs[0] && a.port() != 0));
        // Another agent on the same port fails, even though it would ask
        // for SO_REUSEPORT too.
        let err = bind_group(addrs[0], 2).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        // So does a plain listener.
        let err = std::net::TcpListener::bind(addrs[0]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn every_member_of_a_group_accepts() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = group[0].local_addr().unwrap();
        for l in &group {
            l.set_nonblocking(false).unwrap();
        }
        // Connections from many source ports spread over the members.
        let clients: Vec<_> = (0..64)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut accepted = [0usize; 2];
        for (i, l) in group.iter().enumerate() {
            l.set_nonblocking(true).unwrap();
            while l.accept().is_ok() {
                accepted[i] += 1;
            }
        }
        assert_eq!(accepted.iter().sum::<usize>(), clients.len());
        assert!(accepted.iter().all(|n| *n > 0), "{accepted:?}");
    }
}
