//! The L4 bench's reference relay: the least a user-space TCP relay can do,
//! measured in the same run as direct and Guard, so that the report shows
//! how much of Guard's cost is relaying itself on this machine (a second
//! loopback TCP connection, a third process to wake) and how much is Guard.
//!
//! It runs as its own process (`xtask bench-relay --to ADDR`, outside every
//! monitored cgroup), as the agent does: it binds `127.0.0.2:0`, prints the
//! address it listens on, and serves until killed. Each of its worker
//! threads blocks in `accept`, connects to `--to`, and carries both
//! directions with splice(2) through two pipes and one `poll` loop: no
//! event loop, no task hand-off, no thread created per connection, no
//! lookups, no records. It must never be used for anything but the bench:
//! it only connects to 127.0.0.0/8.

use std::{
    io::{self, BufRead, BufReader, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    process::{Child, Command, Stdio},
    thread,
};

use anyhow::{bail, Context};

/// Options of the hidden `bench-relay` subcommand.
#[derive(clap::Args)]
pub struct RelayArgs {
    /// Where every accepted connection is carried to; must be in 127.0.0.0/8.
    #[arg(long)]
    to: SocketAddr,
}

/// Worker threads, each carrying one connection at a time (the bench's
/// short-connection phase has 4 client threads).
const WORKERS: usize = 16;
/// Bytes one splice call may move (the agent uses the same pipe size).
const PIPE_SIZE: usize = 1 << 20;

/// `xtask bench-relay`: listens, prints the address, relays until killed.
pub fn main(a: RelayArgs) -> anyhow::Result<()> {
    match a.to.ip() {
        IpAddr::V4(ip) if ip.octets()[0] == 127 => {}
        other => bail!("bench-relay only connects to 127.0.0.0/8, not {other}"),
    }
    let l = TcpListener::bind("127.0.0.2:0").context("bind the relay on 127.0.0.2")?;
    println!("{}", l.local_addr()?);
    io::stdout().flush()?;
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let l = l.try_clone()?;
            Ok(thread::spawn(move || {
                for client in l.incoming().flatten() {
                    // A failed connection is the client's to notice.
                    let _ = carry(client, a.to);
                }
            }))
        })
        .collect::<io::Result<_>>()?;
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

/// One direction: bytes from `src` wait in a pipe until `dst` takes them.
struct Direction {
    src: RawFd,
    dst: RawFd,
    pipe_r: OwnedFd,
    pipe_w: OwnedFd,
    /// Bytes in the pipe not yet written to `dst`.
    pending: usize,
    /// `src` reached EOF and `dst`'s write side is shut.
    done: bool,
}

impl Direction {
    fn new(src: RawFd, dst: RawFd) -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid two-element array for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded; both descriptors are ours alone.
        let (pipe_r, pipe_w) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own; failure only costs speed.
        unsafe {
            libc::fcntl(
                pipe_w.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        Ok(Self {
            src,
            dst,
            pipe_r,
            pipe_w,
            pending: 0,
            done: false,
        })
    }

    /// What to wait for before the next step.
    fn poll_fd(&self) -> libc::pollfd {
        let (fd, events) = if self.pending == 0 {
            (self.src, libc::POLLIN)
        } else {
            (self.dst, libc::POLLOUT)
        };
        libc::pollfd {
            fd: if self.done { -1 } else { fd },
            events,
            revents: 0,
        }
    }

    /// Moves what can move now without blocking.
    fn step(&mut self) -> io::Result<()> {
        loop {
            if self.pending == 0 {
                match splice(self.src, self.pipe_w.as_raw_fd(), PIPE_SIZE)? {
                    None => return Ok(()),
                    Some(0) => {
                        // SAFETY: shutdown on a socket that outlives this call.
                        unsafe { libc::shutdown(self.dst, libc::SHUT_WR) };
                        self.done = true;
                        return Ok(());
                    }
                    Some(n) => self.pending = n,
                }
            }
            match splice(self.pipe_r.as_raw_fd(), self.dst, self.pending)? {
                None => return Ok(()),
                Some(n) => self.pending -= n,
            }
        }
    }
}

/// One non-blocking splice; `None` when it would block.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<Option<usize>> {
    // SAFETY: splice between descriptors that stay open for the call; null
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
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Carries one connection both ways until both directions reach EOF.
fn carry(client: TcpStream, to: SocketAddr) -> io::Result<()> {
    let upstream = TcpStream::connect(to)?;
    for s in [&client, &upstream] {
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
    }
    let (c, u) = (client.as_raw_fd(), upstream.as_raw_fd());
    let mut dirs = [Direction::new(c, u)?, Direction::new(u, c)?];
    while !dirs.iter().all(|d| d.done) {
        let mut fds = [dirs[0].poll_fd(), dirs[1].poll_fd()];
        // SAFETY: fds is a valid array of two pollfd for the call.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        for d in dirs.iter_mut().filter(|d| !d.done) {
            d.step()?;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    Ok(())
}

/// A running `bench-relay` process, killed on drop.
pub struct Relay {
    child: Child,
    pub addr: SocketAddr,
}

impl Relay {
    /// Starts `exe bench-relay --to to` and waits for its address.
    pub fn start(exe: &std::path::Path, to: SocketAddr) -> anyhow::Result<Self> {
        Self::spawn(exe, &["bench-relay".into(), "--to".into(), to.to_string()])
    }

    /// Starts `exe args…`, a relay that prints the address it listens on as
    /// its first line, and waits for that line.
    pub fn spawn(exe: &std::path::Path, args: &[String]) -> anyhow::Result<Self> {
        let mut child = Command::new(exe)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {}", args[0]))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("relay stdout")?)
            .read_line(&mut line)
            .context("read the relay's address")?;
        let addr = match line.trim().parse() {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} printed {line:?}, not an address", args[0]);
            }
        };
        Ok(Self { child, addr })
    }

    /// The relay's process id (for its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
