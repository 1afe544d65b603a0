//! UDP programs: DNS to the agent's resolver, other UDP by destination rule.
//!
//! What they do, per monitored UDP socket:
//! - `cgroup/sendmsg4|6` (unconnected sends) and `cgroup/connect4|6` on a
//!   UDP socket (connected sends, what glibc's stub resolver does): a
//!   datagram to port 53 is rewritten to the agent's resolver, whatever the
//!   resolver address (loopback stub resolvers included); who asked and
//!   where it was going are saved by socket cookie in `DNS_BY_COOKIE`.
//!   Any other destination is looked up in `UDP_RULES`; a block returns 0,
//!   which the application sees as `EPERM`.
//! - DNS over TCP: `connect4|6` redirect TCP port 53 to the agent's
//!   listener whatever the destination scope says, while the resolver is up
//!   (the agent answers it with the same resolver).
//! - `cgroup_skb/egress`: for a socket in `DNS_BY_COOKIE`, publishes that
//!   entry under the datagram's source (address, port) in `DNS_BY_PEER`,
//!   which is what the agent's resolver sees as the query's peer. (At
//!   `connect()` a UDP socket has no local port yet, so the packet is the
//!   first place where the port is known.)
//! - `cgroup/recvmsg4|6`: a reply from the agent's resolver on such a socket
//!   is shown to the application as coming from the resolver it asked;
//!   `getpeername` (main.rs) answers the same for a connected one.
//!
//! They must never touch the agent's own sockets (same checks as TCP:
//! tgid and `SO_MARK`), never fail a DNS send, and never drop a packet in
//! the egress program (it only observes).

use aya_ebpf::{
    helpers::bpf_get_socket_cookie,
    macros::{cgroup_skb, cgroup_sock_addr, map},
    maps::{lpm_trie::Key, Array, LpmTrie, LruHashMap},
    programs::{SkBuffContext, SockAddrContext},
};
use aya_log_ebpf::{debug, warn};
use guard_common::{
    udp_rule_key, DnsConfig, OriginalDst, SockAddrKey, DNS_PORT, UDP_BLOCK, UDP_RULE_KEY_LEN,
};

use crate::{
    bytes_to_word, config, is_v4_mapped, original_dst, task_in_scope, words_to_bytes, AF_INET,
    AF_INET6, ALLOW,
};

const SOCK_DGRAM: u32 = 2;
/// Return value that fails the syscall with `EPERM`.
const DENY: i32 = 0;
const IPPROTO_UDP: u8 = 17;

/// Where the agent's resolver listens; index 0.
#[map]
static DNS_CONFIG: Array<DnsConfig> = Array::with_max_entries(1, 0);

/// Sockets whose DNS was redirected, by cookie: until the socket is gone
/// (LRU; a UDP socket has no close callback here).
#[map]
static DNS_BY_COOKIE: LruHashMap<u64, OriginalDst> = LruHashMap::with_max_entries(16384, 0);

/// The same entries by the datagram's source (address, port), published on
/// each query; the agent takes them as it reads the query.
#[map]
static DNS_BY_PEER: LruHashMap<SockAddrKey, OriginalDst> = LruHashMap::with_max_entries(16384, 0);

/// UDP destination rules: key data = port (network order, 0 = any) then
/// the 16-byte address; value UDP_BLOCK or UDP_ALLOW. The longest prefix
/// wins; rules for the exact port are consulted before any-port rules.
#[map]
static UDP_RULES: LpmTrie<[u8; UDP_RULE_KEY_LEN], u8> = LpmTrie::with_max_entries(4096, 1); // BPF_F_NO_PREALLOC

#[inline(always)]
fn udp_blocked(dst: &SockAddrKey) -> bool {
    let full = (UDP_RULE_KEY_LEN * 8) as u32;
    if let Some(v) = UDP_RULES.get(&Key::new(full, udp_rule_key(dst.port, dst.addr))) {
        return *v == UDP_BLOCK;
    }
    matches!(UDP_RULES.get(&Key::new(full, udp_rule_key(0, dst.addr))), Some(v) if *v == UDP_BLOCK)
}

#[inline(always)]
unsafe fn is_udp(ctx: &SockAddrContext) -> bool {
    (*ctx.sock_addr).type_ == SOCK_DGRAM
}

/// Saves where a DNS socket was going and who asked, by cookie.
#[inline(always)]
unsafe fn remember_dns(ctx: &SockAddrContext, dst: SockAddrKey, family: u32) -> bool {
    let entry = original_dst(dst, family);
    let cookie = bpf_get_socket_cookie(ctx.sock_addr as *mut _);
    if DNS_BY_COOKIE.insert(&cookie, &entry, 0).is_err() {
        warn!(ctx, "guard: could not save a DNS destination of tgid {}; not redirected", entry.tgid);
        return false;
    }
    true
}

/// The DNS entry of a (connected) UDP socket, for `getpeername`.
#[inline(always)]
pub(crate) unsafe fn dns_original(cookie: u64) -> Option<&'static OriginalDst> {
    DNS_BY_COOKIE.get(&cookie)
}

/// Whether a TCP connect to `port` goes to the agent whatever its address:
/// DNS over TCP, while the resolver is up (like DNS over UDP, loopback stub
/// resolvers included).
#[inline(always)]
pub(crate) fn dns_over_tcp_redirected(port: u16) -> bool {
    port == DNS_PORT
        && matches!(DNS_CONFIG.get(0), Some(d) if d.resolver_v4_port != 0 || d.resolver_v6_port != 0)
}

/// connect4 on a UDP socket: `Some(verdict)`; `None` for other sockets.
#[inline(always)]
pub(crate) unsafe fn connect4(ctx: &SockAddrContext) -> Option<i32> {
    if !is_udp(ctx) {
        return None;
    }
    Some(udp4(ctx))
}

/// connect6 on a UDP socket: `Some(verdict)`; `None` for other sockets.
#[inline(always)]
pub(crate) unsafe fn connect6(ctx: &SockAddrContext) -> Option<i32> {
    if !is_udp(ctx) {
        return None;
    }
    Some(udp6(ctx))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn guard_sendmsg4(ctx: SockAddrContext) -> i32 {
    unsafe { udp4(&ctx) }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn guard_sendmsg6(ctx: SockAddrContext) -> i32 {
    unsafe { udp6(&ctx) }
}

#[inline(never)]
unsafe fn udp4(ctx: &SockAddrContext) -> i32 {
    let Some(cfg) = config() else { return ALLOW };
    if !task_in_scope(ctx, cfg) {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    let ip = (*sa).user_ip4.to_ne_bytes();
    let port = u16::from_be((*sa).user_port as u16);
    let dst = SockAddrKey::from_v4(ip, port);
    if port == DNS_PORT {
        let Some(dc) = DNS_CONFIG.get(0) else { return ALLOW };
        if dc.resolver_v4_port == 0 || !remember_dns(ctx, dst, AF_INET) {
            return ALLOW;
        }
        (*sa).user_ip4 = u32::from_ne_bytes(dc.resolver_v4);
        (*sa).user_port = dc.resolver_v4_port.to_be() as u32;
        if crate::debug_log() {
            debug!(ctx, "guard: DNS (v4) sent to the agent's resolver");
        }
        return ALLOW;
    }
    if udp_blocked(&dst) {
        if crate::debug_log() {
            debug!(ctx, "guard: UDP to port {} refused", port);
        }
        return DENY;
    }
    ALLOW
}

#[inline(never)]
unsafe fn udp6(ctx: &SockAddrContext) -> i32 {
    let Some(cfg) = config() else { return ALLOW };
    if !task_in_scope(ctx, cfg) {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    let ip = words_to_bytes([
        (*sa).user_ip6[0],
        (*sa).user_ip6[1],
        (*sa).user_ip6[2],
        (*sa).user_ip6[3],
    ]);
    let port = u16::from_be((*sa).user_port as u16);
    let dst = SockAddrKey::from_v6(ip, port);
    if port == DNS_PORT {
        let Some(dc) = DNS_CONFIG.get(0) else { return ALLOW };
        // A v6 socket asking an IPv4 resolver goes to the IPv4 resolver
        // through its mapped address.
        let (to, to_port) = if is_v4_mapped(&ip) {
            (SockAddrKey::from_v4(dc.resolver_v4, 0).addr, dc.resolver_v4_port)
        } else {
            (dc.resolver_v6, dc.resolver_v6_port)
        };
        if to_port == 0 || !remember_dns(ctx, dst, AF_INET6) {
            return ALLOW;
        }
        (*sa).user_ip6[0] = bytes_to_word(&to, 0);
        (*sa).user_ip6[1] = bytes_to_word(&to, 1);
        (*sa).user_ip6[2] = bytes_to_word(&to, 2);
        (*sa).user_ip6[3] = bytes_to_word(&to, 3);
        (*sa).user_port = to_port.to_be() as u32;
        if crate::debug_log() {
            debug!(ctx, "guard: DNS (v6) sent to the agent's resolver");
        }
        return ALLOW;
    }
    if udp_blocked(&dst) {
        if crate::debug_log() {
            debug!(ctx, "guard: UDP to port {} refused", port);
        }
        return DENY;
    }
    ALLOW
}

/// The DNS entry of the receiving socket, if its DNS was redirected.
#[inline(always)]
unsafe fn dns_reply_origin(ctx: &SockAddrContext) -> Option<&'static OriginalDst> {
    let cookie = bpf_get_socket_cookie(ctx.sock_addr as *mut _);
    DNS_BY_COOKIE.get(&cookie)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn guard_recvmsg4(ctx: SockAddrContext) -> i32 {
    unsafe {
        let sa = ctx.sock_addr;
        if let (Some(orig), Some(dc)) = (dns_reply_origin(&ctx), DNS_CONFIG.get(0)) {
            let from_ip = (*sa).user_ip4.to_ne_bytes();
            let from_port = u16::from_be((*sa).user_port as u16);
            let a = orig.dst.addr;
            if from_ip == dc.resolver_v4 && from_port == dc.resolver_v4_port && is_v4_mapped(&a) {
                (*sa).user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
                (*sa).user_port = orig.dst.port.to_be() as u32;
            }
        }
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn guard_recvmsg6(ctx: SockAddrContext) -> i32 {
    unsafe {
        let sa = ctx.sock_addr;
        if let (Some(orig), Some(dc)) = (dns_reply_origin(&ctx), DNS_CONFIG.get(0)) {
            let from = words_to_bytes([
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ]);
            let from_port = u16::from_be((*sa).user_port as u16);
            let v4 = SockAddrKey::from_v4(dc.resolver_v4, 0).addr;
            let from_resolver = (from == v4 && from_port == dc.resolver_v4_port)
                || (from == dc.resolver_v6 && from_port == dc.resolver_v6_port);
            if from_resolver {
                let a = orig.dst.addr;
                (*sa).user_ip6[0] = bytes_to_word(&a, 0);
                (*sa).user_ip6[1] = bytes_to_word(&a, 1);
                (*sa).user_ip6[2] = bytes_to_word(&a, 2);
                (*sa).user_ip6[3] = bytes_to_word(&a, 3);
                (*sa).user_port = orig.dst.port.to_be() as u32;
            }
        }
    }
    ALLOW
}

#[cgroup_skb(egress)]
pub fn guard_dns_egress(ctx: SkBuffContext) -> i32 {
    let _ = unsafe { publish_dns_peer(&ctx) };
    1 // let the packet through, always
}

/// Publishes the DNS entry of the sending socket under the packet's source.
unsafe fn publish_dns_peer(ctx: &SkBuffContext) -> Result<(), i64> {
    let cookie = bpf_get_socket_cookie(ctx.skb.skb as *mut _);
    let Some(entry) = DNS_BY_COOKIE.get(&cookie) else { return Ok(()) };
    let first: u8 = ctx.load(0)?;
    let key = match first >> 4 {
        4 => {
            let ihl = ((first & 0x0f) as usize) * 4;
            if ctx.load::<u8>(9)? != IPPROTO_UDP || ihl < 20 || ihl > 60 {
                return Ok(());
            }
            let src: [u8; 4] = ctx.load(12)?;
            let port: u16 = ctx.load(ihl)?;
            SockAddrKey::from_v4(src, u16::from_be(port))
        }
        6 => {
            if ctx.load::<u8>(6)? != IPPROTO_UDP {
                return Ok(());
            }
            let src: [u8; 16] = ctx.load(8)?;
            let port: u16 = ctx.load(40)?;
            SockAddrKey::from_v6(src, u16::from_be(port))
        }
        _ => return Ok(()),
    };
    let copy = *entry;
    if DNS_BY_PEER.insert(&key, &copy, 0).is_err() {
        warn!(ctx, "guard: could not publish a DNS query of tgid {}", copy.tgid);
    }
    Ok(())
}
