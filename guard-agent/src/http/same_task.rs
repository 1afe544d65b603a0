//! Runs the upstream side of a client connection in the task that serves
//! the client side: the hyper client connection futures of an
//! [`Upstream`](super::upstream::Upstream) are handed to a [`DriverHandle`]
//! and polled by [`serve_with_upstream`] together with the hyper server
//! connection, so a request and its response do not hop between tasks (and
//! tokio worker threads) on their way through the agent.
//!
//! A wake-up of one side while the task is polling the other is noted, not
//! sent to the scheduler: the task polls that side at once instead of
//! re-queueing itself (a task that wakes itself is queued again and may wake
//! an idle worker thread to run it).
//!
//! Never: drop a connection future that is not done while its client
//! connection is served; what is left when the client side ends runs on in
//! a task of its own, as it would have from the start.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll, Wake, Waker},
};

use tokio::sync::mpsc;

/// A connection future of the upstream side (it ends when the connection does).
type ConnFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where an upstream hands its connection futures.
#[derive(Clone)]
pub struct DriverHandle(mpsc::UnboundedSender<ConnFuture>);

/// The connection futures of one client connection's upstream side.
pub struct Drivers {
    incoming: mpsc::UnboundedReceiver<ConnFuture>,
    running: Vec<ConnFuture>,
}

/// A handle for the upstream and the drivers for the serving task.
pub fn drivers() -> (DriverHandle, Drivers) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        DriverHandle(tx),
        Drivers {
            incoming: rx,
            running: Vec::new(),
        },
    )
}

impl DriverHandle {
    /// Has `conn` polled by the task serving the client connection, or by a
    /// task of its own when that one is gone.
    pub fn drive(&self, conn: impl Future<Output = ()> + Send + 'static) {
        if let Err(mpsc::error::SendError(conn)) = self.0.send(Box::pin(conn)) {
            tokio::spawn(conn);
        }
    }
}

impl Drivers {
    /// Polls every connection future; ready once no more can come and all
    /// have ended.
    fn poll_connections(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut closed = false;
        loop {
            match self.incoming.poll_recv(cx) {
                Poll::Ready(Some(conn)) => self.running.push(conn),
                Poll::Ready(None) => {
                    closed = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        self.running
            .retain_mut(|c| c.as_mut().poll(cx).is_pending());
        if closed && self.running.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Hands what is left to a task of its own (the client side ended).
    pub(crate) fn run_on(mut self) {
        while let Ok(conn) = self.incoming.try_recv() {
            self.running.push(conn);
        }
        if self.running.is_empty() {
            // Dropping the receiver: later connections get tasks of their own.
            return;
        }
        tokio::spawn(std::future::poll_fn(move |cx| self.poll_connections(cx)));
    }
}

/// The serving task is inside its poll.
const POLLING: u8 = 1;
/// The server connection was woken.
const SERVER: u8 = 2;
/// An upstream connection was woken.
const UPSTREAM: u8 = 4;
/// Rounds of one poll before the task yields to others.
const MAX_ROUNDS: usize = 16;

/// Which side needs polling, and the task's own waker.
struct Wakes {
    state: AtomicU8,
    task: Mutex<Option<Waker>>,
}

/// The waker one side is polled with.
struct SideWaker {
    wakes: Arc<Wakes>,
    side: u8,
}

impl Wake for SideWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let before = self.wakes.state.fetch_or(self.side, Ordering::AcqRel);
        if before & POLLING == 0 {
            if let Some(w) = self
                .wakes
                .task
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                w.wake_by_ref();
            }
        }
    }
}

/// Serves a client connection (`server`, a hyper server connection future)
/// while driving its upstream connections in the same task. Resolves to
/// what the server connection resolves to.
pub fn serve_with_upstream<F: Future>(server: F, drivers: Option<Drivers>) -> Both<F> {
    let wakes = Arc::new(Wakes {
        state: AtomicU8::new(SERVER | UPSTREAM),
        task: Mutex::new(None),
    });
    let waker = |side| {
        Waker::from(Arc::new(SideWaker {
            wakes: Arc::clone(&wakes),
            side,
        }))
    };
    Both {
        server: Box::pin(server),
        drivers,
        server_waker: waker(SERVER),
        upstream_waker: waker(UPSTREAM),
        wakes,
    }
}

/// The server connection and the upstream connections, polled together.
pub struct Both<F> {
    server: Pin<Box<F>>,
    drivers: Option<Drivers>,
    server_waker: Waker,
    upstream_waker: Waker,
    wakes: Arc<Wakes>,
}

impl<F> Both<F> {
    /// The server connection ended: what is left of the upstream side runs on.
    fn server_done(&mut self) {
        self.wakes.state.fetch_and(!POLLING, Ordering::AcqRel);
        if let Some(drivers) = self.drivers.take() {
            drivers.run_on();
        }
    }
}

impl<F: Future> Future for Both<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        if this.drivers.is_none() {
            return this.server.as_mut().poll(cx);
        }
        let wakes = Arc::clone(&this.wakes);
        {
            let mut task = wakes.task.lock().unwrap_or_else(|e| e.into_inner());
            if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        wakes.state.fetch_or(POLLING, Ordering::AcqRel);
        for _ in 0..MAX_ROUNDS {
            let woken = wakes
                .state
                .fetch_and(!(SERVER | UPSTREAM), Ordering::AcqRel);
            if woken & UPSTREAM != 0 {
                if let Some(d) = this.drivers.as_mut() {
                    let _ = d.poll_connections(&mut Context::from_waker(&this.upstream_waker));
                }
            }
            if woken & SERVER != 0 {
                if let Poll::Ready(out) = this
                    .server
                    .as_mut()
                    .poll(&mut Context::from_waker(&this.server_waker))
                {
                    this.server_done();
                    return Poll::Ready(out);
                }
            }
            if woken & (SERVER | UPSTREAM) == 0
                && wakes
                    .state
                    .compare_exchange(POLLING, 0, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                // Nothing left to poll; a later wake-up wakes the task.
                return Poll::Pending;
            }
        }
        // Busy: let other tasks run, and come back for what is pending.
        let left = wakes.state.fetch_and(!POLLING, Ordering::AcqRel);
        if left & (SERVER | UPSTREAM) != 0 {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    /// A request/response exchange between the two sides, in one task: the
    /// server side asks, the upstream side (driven alongside) answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_sides_make_progress_in_one_task_and_leftovers_run_on() {
        let (handle, drivers) = drivers();
        let (ask_tx, mut ask_rx) = mpsc::unbounded_channel::<(u32, oneshot::Sender<u32>)>();
        let (ended_tx, ended_rx) = oneshot::channel();
        handle.drive(async move {
            while let Some((n, answer)) = ask_rx.recv().await {
                let _ = answer.send(n * 2);
            }
            let _ = ended_tx.send(());
        });
        let server = async move {
            let mut sum = 0;
            for n in 0..100 {
                let (tx, rx) = oneshot::channel();
                ask_tx.send((n, tx)).unwrap();
                sum += rx.await.unwrap();
            }
            (sum, ask_tx)
        };
        let (sum, ask_tx) = serve_with_upstream(server, Some(drivers)).await;
        assert_eq!(sum, 2 * (0..100).sum::<u32>());
        // The upstream side outlives the server side: it runs on, and ends
        // when its own input does.
        drop(ask_tx);
        drop(handle);
        tokio::time::timeout(std::time::Duration::from_secs(5), ended_rx)
            .await
            .expect("the leftover connection future ran to its end")
            .unwrap();
    }

    #[tokio::test]
    async fn a_connection_handed_over_after_the_server_side_ended_still_runs() {
        let (handle, drivers) = drivers();
        serve_with_upstream(async {}, Some(drivers)).await;
        let (tx, rx) = oneshot::channel();
        handle.drive(async move {
            let _ = tx.send(());
        });
        rx.await.unwrap();
    }
}
