//! Connecting to an original destination: from a socket carrying the
//! agent's `SO_MARK`, so Guard's kernel programs never redirect it back to
//! the agent, with a bounded connect time and errors in words.

use std::{io, net::SocketAddr, time::Duration};

use tokio::net::{TcpSocket, TcpStream};

/// How long an upstream connect (TCP, and TLS where used) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `addr` from a socket marked with `mark`.
pub async fn connect_tcp(addr: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket2::SockRef::from(&sock).set_mark(mark)?;
    // Set before connecting: nothing is left to do once the handshake ends.
    sock.set_nodelay(true)?;
    tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Why an upstream TCP connect failed, in words.
pub fn describe_connect_error(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "upstream refused the connection (ECONNREFUSED)".into(),
        Some(libc::EHOSTUNREACH) => "upstream host unreachable (EHOSTUNREACH)".into(),
        Some(libc::ENETUNREACH) => "upstream network unreachable (ENETUNREACH)".into(),
        Some(libc::ETIMEDOUT) => "upstream connect timed out (ETIMEDOUT)".into(),
        _ if e.kind() == io::ErrorKind::TimedOut => {
            format!(
                "upstream connect timed out after {}s",
                CONNECT_TIMEOUT.as_secs()
            )
        }
        _ => format!("upstream connect failed: {e}"),
    }
}
