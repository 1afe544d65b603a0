//! Forwarding a query to the host's resolvers: the configured upstreams, or
//! the `nameserver` lines of `/etc/resolv.conf`, tried in order.
//!
//! Every query gets its own socket (a fresh random source port, connected to
//! the upstream, so only that upstream's answer is read) carrying the
//! agent's `SO_MARK`; the kernel programs never redirect the agent's sockets.
//! Answers are checked to carry the query's id. This module never answers
//! on its own: a failure is an error for the caller to turn into SERVFAIL.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

/// The largest UDP answer read from an upstream.
const MAX_UDP: usize = 4096;

/// The resolvers in a resolv.conf text, with port 53. Loopback stub
/// resolvers (127.0.0.53) are kept: the agent's own sockets are not
/// redirected, so they are reached directly.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let l = l.split(['#', ';']).next()?.trim();
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            // `fe80::1%eth0`: the zone is dropped (link-local needs it; rare).
            let addr = words.next()?.split('%').next()?;
            addr.parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

/// The host's resolvers from `/etc/resolv.conf` (empty if unreadable).
pub fn system_resolvers(path: &Path) -> Vec<SocketAddr> {
    match std::fs::read_to_string(path) {
        Ok(t) => parse_resolv_conf(&t),
        Err(e) => {
            tracing::warn!("cannot read {}: {e}; no upstream resolver", path.display());
            Vec::new()
        }
    }
}

/// Why forwarding failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolver configured (set `dns: (upstream: [...])` or --dns-upstream)")]
    NoUpstream,
    #[error("upstream {upstream}: {message}")]
    Upstream {
        upstream: SocketAddr,
        message: String,
    },
}

fn io_err(upstream: SocketAddr) -> impl Fn(std::io::Error) -> ForwardError {
    move |e| ForwardError::Upstream {
        upstream,
        message: e.to_string(),
    }
}

fn marked(addr: SocketAddr, mark: u32, ty: socket2::Type) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    if mark != 0 {
        s.set_mark(mark)?;
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Sends `query` to each upstream in turn over UDP; returns the first
/// answer with the query's id and the upstream that gave it.
pub async fn forward_udp(
    query: &[u8],
    upstreams: &[SocketAddr],
    mark: u32,
    timeout: Duration,
) -> Result<(Vec<u8>, SocketAddr), ForwardError> {
    first_answer(upstreams, timeout, |up| ask_udp(query, up, mark)).await
}

/// Asks each upstream in turn with `ask`, each within `timeout`; returns the
/// first answer and who gave it, or the last failure.
async fn first_answer<F, Fut>(
    upstreams: &[SocketAddr],
    timeout: Duration,
    ask: F,
) -> Result<(Vec<u8>, SocketAddr), ForwardError>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<u8>, ForwardError>>,
{
    let mut last = ForwardError::NoUpstream;
    for &up in upstreams {
        match tokio::time::timeout(timeout, ask(up)).await {
            Ok(Ok(answer)) => return Ok((answer, up)),
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = ForwardError::Upstream {
                    upstream: up,
                    message: format!("no answer within {}s", timeout.as_secs()),
                }
            }
        }
    }
    Err(last)
}

async fn ask_udp(query: &[u8], up: SocketAddr, mark: u32) -> Result<Vec<u8>, ForwardError> {
    let err = io_err(up);
    let s = marked(up, mark, socket2::Type::DGRAM).map_err(&err)?;
    let any: SocketAddr = if up.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    s.bind(&any.into()).map_err(&err)?;
    let sock = UdpSocket::from_std(s.into()).map_err(&err)?;
    sock.connect(up).await.map_err(&err)?;
    sock.send(query).await.map_err(&err)?;
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let n = sock.recv(&mut buf).await.map_err(&err)?;
        // Same id as the query, else keep waiting (a late answer to another
        // query cannot arrive here: the socket is ours alone).
        if n >= 2 && query.len() >= 2 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

/// Sends `query` to each upstream in turn over TCP (2-byte length prefix).
pub async fn forward_tcp(
    query: &[u8],
    upstreams: &[SocketAddr],
    mark: u32,
    timeout: Duration,
) -> Result<(Vec<u8>, SocketAddr), ForwardError> {
    first_answer(upstreams, timeout, |up| ask_tcp(query, up, mark)).await
}

async fn ask_tcp(query: &[u8], up: SocketAddr, mark: u32) -> Result<Vec<u8>, ForwardError> {
    let err = io_err(up);
    let mut stream = crate::intercept::connect::connect_tcp(up, mark)
        .await
        .map_err(&err)?;
    let len = u16::try_from(query.len()).map_err(|_| ForwardError::Upstream {
        upstream: up,
        message: "query longer than 65535 bytes".into(),
    })?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await.map_err(&err)?;
    read_framed(&mut stream).await.map_err(&err)
}

/// Reads one length-prefixed DNS message from a TCP stream.
pub async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_in_order() {
        let text = "# generated\nsearch example.com\nnameserver 127.0.0.53\nnameserver ::1 # local\n;nameserver 10.0.0.1\noptions edns0\nnameserver fe80::1%eth0\nnameserver bogus\n";
        let got: Vec<String> = parse_resolv_conf(text)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(got, vec!["127.0.0.53:53", "[::1]:53", "[fe80::1]:53"]);
    }
}
