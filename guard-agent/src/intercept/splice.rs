//! Carrying bytes between the client and the upstream, both directions at
//! once, counting what went each way and propagating half-closes.
//!
//! Spliced connections move through a pipe with splice(2): the bytes never
//! enter user space. Connections the agent terminates are counted by
//! [`CountingIo`] around the client stream. Counts are atomics so that a
//! connection that ends in an error still reports what it carried.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

#[cfg(test)]
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::TcpStream,
};

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

    /// The stream, no longer counted.
    pub fn into_inner(self) -> S {
        self.inner
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

    /// Vectored writes go through as such: rustls hands over every TLS
    /// record it has queued at once, and without this they would leave one
    /// `send` each (a 16 KiB record per syscall on a download).
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.counts.inbound.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A pipe used as the in-kernel buffer between two sockets.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid two-element array for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, both descriptors are ours.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe moves more per syscall; failure only costs speed.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        Ok(Self { read, write })
    }
}

/// Bytes the kernel may move per splice call.
const PIPE_SIZE: usize = 1 << 20;
/// Empty pipes kept for reuse: creating and sizing a pipe costs four
/// syscalls per connection direction.
const PIPE_POOL_MAX: usize = 256;

static PIPE_POOL: std::sync::Mutex<Vec<Pipe>> = std::sync::Mutex::new(Vec::new());

/// A pipe from the pool, given back on drop only when known empty.
struct PooledPipe {
    pipe: Option<Pipe>,
    empty: bool,
}

impl PooledPipe {
    fn take() -> io::Result<Self> {
        let reused = PIPE_POOL.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let pipe = match reused {
            Some(p) => p,
            None => Pipe::new()?,
        };
        Ok(Self {
            pipe: Some(pipe),
            empty: true,
        })
    }

    fn get(&self) -> &Pipe {
        self.pipe.as_ref().expect("present until drop")
    }
}

impl Drop for PooledPipe {
    fn drop(&mut self) {
        if let (true, Some(p)) = (self.empty, self.pipe.take()) {
            let mut pool = PIPE_POOL.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < PIPE_POOL_MAX {
                pool.push(p);
            }
        }
    }
}

fn splice_fd(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice on descriptors that stay open for the call; null
    // offsets are required for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Moves bytes from `src` to `dst` through a pipe with splice(2), without
/// copying them into user space, until `src` reaches EOF; then shuts `dst`'s
/// write side down.
async fn pump(src: &TcpStream, dst: &TcpStream, counter: &AtomicU64) -> io::Result<()> {
    let mut pooled = PooledPipe::take()?;
    let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
    let (pipe_r, pipe_w) = (
        pooled.get().read.as_raw_fd(),
        pooled.get().write.as_raw_fd(),
    );
    loop {
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || splice_fd(src_fd, pipe_w, PIPE_SIZE)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break r?,
            }
        };
        if n == 0 {
            socket2::SockRef::from(dst)
                .shutdown(std::net::Shutdown::Write)
                .or_else(|e| {
                    if e.kind() == io::ErrorKind::NotConnected {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })?;
            return Ok(());
        }
        // Bytes sit in the pipe until drained: if this future is dropped or
        // fails meanwhile, the pipe must not go back to the pool (another
        // connection would receive them).
        pooled.empty = false;
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || splice_fd(pipe_r, dst_fd, left)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => left -= r?,
            }
        }
        pooled.empty = true;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Carries both directions between a client and its upstream until both
/// reach EOF, zero-copy. The first error ends both directions.
pub async fn splice(client: TcpStream, upstream: TcpStream, counts: &ByteCounts) -> io::Result<()> {
    tokio::try_join!(
        pump(&client, &upstream, &counts.out),
        pump(&upstream, &client, &counts.inbound)
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn both_directions_are_counted_and_half_closed() {
        // client_peer <-> [client ~ upstream] <-> upstream_peer
        let (mut client_peer, client) = pair().await;
        let (upstream, mut upstream_peer) = pair().await;
        let counts = ByteCounts::default();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let task = async {
            client_peer.write_all(&big).await.unwrap();
            client_peer.shutdown().await.unwrap();
            let mut got = Vec::new();
            upstream_peer.read_to_end(&mut got).await.unwrap();
            assert!(got == big, "bytes differ");
            upstream_peer.write_all(b"hi").await.unwrap();
            upstream_peer.shutdown().await.unwrap();
            let mut back = Vec::new();
            client_peer.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"hi");
        };
        let (r, ()) = tokio::join!(splice(client, upstream, &counts), task);
        r.unwrap();
        assert_eq!(counts.out.load(Ordering::Relaxed), 3_000_000);
        assert_eq!(counts.inbound.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn vectored_writes_pass_through_whole_and_are_counted() {
        let (a, mut b) = pair().await;
        let counts = Arc::new(ByteCounts::default());
        let mut io = CountingIo::new(a, Arc::clone(&counts));
        assert!(io.is_write_vectored());
        let bufs = [io::IoSlice::new(b"one "), io::IoSlice::new(b"two")];
        // Both slices in one call: a TCP socket takes 7 bytes at once.
        let n = io.write_vectored(&bufs).await.unwrap();
        assert_eq!(n, 7);
        assert_eq!(counts.inbound.load(Ordering::Relaxed), 7);
        drop(io);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"one two");
    }
}
