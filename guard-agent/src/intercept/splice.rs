//! Copying bytes between the client and the upstream, both directions at
//! once, counting what went each way and propagating half-closes.
//!
//! Counts are kept in atomics so that a connection that ends in an error
//! still reports what it carried.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Buffer per direction.
const BUF: usize = 64 * 1024;

/// Bytes carried each way.
#[derive(Debug, Default)]
pub struct ByteCounts {
    /// Client → upstream.
    pub out: AtomicU64,
    /// Upstream → client.
    pub inbound: AtomicU64,
}

/// A client stream that counts what passes through it (for connections the
/// agent terminates rather than splices).
pub struct CountingIo<S> {
    inner: S,
    counts: Arc<ByteCounts>,
}

impl<S> CountingIo<S> {
    pub fn new(inner: S, counts: Arc<ByteCounts>) -> Self {
        Self { inner, counts }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CountingIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.counts.out.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountingIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.counts.inbound.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies `r` to `w` until EOF, then shuts `w`'s write side down.
pub async fn copy_counted<R, W>(mut r: R, mut w: W, counter: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Copies both ways between two streams until both directions are done.
/// Returns the first error, if any.
pub async fn splice<A, B>(client: A, upstream: B, counts: &ByteCounts) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (cr, cw) = tokio::io::split(client);
    let (ur, uw) = tokio::io::split(upstream);
    let (a, b) = tokio::join!(
        copy_counted(cr, uw, &counts.out),
        copy_counted(ur, cw, &counts.inbound)
    );
    a.and(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_directions_are_counted_and_half_closed() {
        let (client, mut client_peer) = tokio::io::duplex(1024);
        let (upstream, mut upstream_peer) = tokio::io::duplex(1024);
        let counts = ByteCounts::default();
        let task = async {
            client_peer.write_all(b"hello upstream").await.unwrap();
            client_peer.shutdown().await.unwrap();
            let mut got = Vec::new();
            upstream_peer.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello upstream");
            upstream_peer.write_all(b"hi").await.unwrap();
            upstream_peer.shutdown().await.unwrap();
            let mut back = Vec::new();
            client_peer.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"hi");
        };
        let (r, ()) = tokio::join!(splice(client, upstream, &counts), task);
        r.unwrap();
        assert_eq!(counts.out.load(Ordering::Relaxed), 14);
        assert_eq!(counts.inbound.load(Ordering::Relaxed), 2);
    }
}
