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
//! What this module must never do: share one listening socket between
//! threads (each would wake for every connection), or move a connection
//! between threads. Everything else the agent runs (admin socket, store
//! writer, DNS over UDP, metrics) stays on the main runtime.

use std::{io, net::SocketAddr, sync::Arc, thread};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
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
        let mut done = Vec::new();
        for (i, socks) in listeners.into_iter().enumerate() {
            // Built here so that a failure stops the start-up.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (done_tx, done_rx) = oneshot::channel();
            let (ctx, close_rx, stop) = (Arc::clone(&ctx), close_rx.clone(), stop.clone());
            thread::Builder::new()
                .name(format!("guard-intercept-{i}"))
                .spawn(move || {
                    rt.block_on(serve_all(socks, ctx, close_rx, stop));
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

/// One thread's work: accept on each of its sockets until closed, then
/// wait for the connections it accepted.
async fn serve_all(
    socks: Vec<std::net::TcpListener>,
    ctx: Arc<Intercept>,
    close: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
) {
    let mut serving = Vec::new();
    for s in socks {
        match TcpListener::from_std(s) {
            Ok(l) => serving.push(tokio::spawn(listener::serve(
                l,
                Arc::clone(&ctx),
                close.clone(),
                stop.clone(),
            ))),
            Err(e) => tracing::error!("cannot serve a listening socket: {e}"),
        }
    }
    drop(ctx);
    for s in serving {
        let _ = s.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
