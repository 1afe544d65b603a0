//! Guard's kernel programs.
//!
//! What they do, per monitored socket:
//! - `cgroup/connect4|6`: a TCP `connect()` from a process in scope (its
//!   cgroup has these programs attached, its uid is in scope when a uid list
//!   is set, and its destination falls in an intercepted prefix) is rewritten
//!   to the agent's listener; where it was going and who asked is saved by
//!   socket cookie in `ORIG_BY_COOKIE`.
//! - `sockops`: when that socket's connect starts, ask for TCP state
//!   callbacks; once it is established, copy the entry under the client's
//!   local (address, port) into `ORIG_BY_PEER`, which is what the agent sees
//!   as the peer of the accepted connection; on close, drop the cookie entry.
//!   The agent removes the `ORIG_BY_PEER` entry once it has read it; both
//!   maps are LRU, so nothing lingers if either side forgets.
//! - `cgroup/getpeername4|6`: the application sees the peer it asked for,
//!   not the agent.
//! - UDP (DNS to the agent's resolver, blocked UDP destinations): `udp.rs`;
//!   `connect4|6` hand UDP sockets to it.
//!
//! - Fail mode (`LIVENESS`): with a fail-open window set, a connect is not
//!   redirected once the agent's heartbeat is older than the window; with
//!   none (enforce), it is redirected even to a dead agent, so it is refused.
//! - Exclusions (`EXCLUDED_CGROUPS`): a caller whose cgroup, or any ancestor
//!   up to `MAX_EXCLUDED_CGROUP_LEVEL`, is excluded is never redirected.
//!
//! They must never redirect the agent's own sockets (its tgid, and any
//! socket carrying the agent's `SO_MARK`), and never fail a TCP `connect()`:
//! every TCP path returns "allow", with or without a rewrite. Decisions that can live in user space do.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use guard_common::{
    AgentLiveness, KernelConfig, OriginalDst, SockAddrKey, MAX_EXCLUDED_CGROUP_LEVEL,
    SCOPE_INTERCEPT,
};

mod udp;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
/// Return value that lets the syscall proceed.
const ALLOW: i32 = 1;

/// The agent's settings; index 0.
#[map]
static CONFIG: Array<KernelConfig> = Array::with_max_entries(1, 0);

/// uids in scope when `KernelConfig::uid_filter` is set.
#[map]
static SCOPE_UIDS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

/// Destination prefixes (IPv4 mapped into IPv6) → SCOPE_INTERCEPT or
/// SCOPE_EXCLUDE; the longest matching prefix decides, no match = exclude.
#[map]
static DEST_SCOPE: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(4096, 1); // BPF_F_NO_PREALLOC

/// Redirected sockets by cookie, from connect until close.
#[map]
static ORIG_BY_COOKIE: LruHashMap<u64, OriginalDst> = LruHashMap::with_max_entries(65536, 0);

/// Redirected, established sockets by the client's local address: what the
/// agent looks up for each accepted connection.
#[map]
static ORIG_BY_PEER: LruHashMap<SockAddrKey, OriginalDst> =
    LruHashMap::with_max_entries(65536, 0);

// --- Fail mode and exclusions -------------------------------------------

/// The agent's heartbeat and fail-open window; index 0.
#[map]
static LIVENESS: Array<AgentLiveness> = Array::with_max_entries(1, 0);

/// cgroup ids whose processes (and descendants) are never redirected.
#[map]
static EXCLUDED_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(1024, 0);

/// False when fail-open is configured and the agent's heartbeat is stale:
/// the connect then goes direct. True in enforce mode, alive or not.
#[inline(always)]
fn agent_alive() -> bool {
    match LIVENESS.get(0) {
        Some(l) if l.fail_open_after_ns != 0 => {
            let now = unsafe { bpf_ktime_get_ns() };
            now.saturating_sub(l.heartbeat_ns) <= l.fail_open_after_ns
        }
        _ => true,
    }
}

/// Whether the caller's cgroup or one of its ancestors is excluded.
#[inline(always)]
fn cgroup_excluded() -> bool {
    let mut level: i32 = 1;
    while level <= MAX_EXCLUDED_CGROUP_LEVEL as i32 {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return false; // above the caller's own level
        }
        if EXCLUDED_CGROUPS.get_ptr(&id).is_some() {
            return true;
        }
        level += 1;
    }
    false
}

// --- Configuration and scope --------------------------------------------

/// Whether per-connection debug records are wanted ([`KernelConfig::debug_log`]).
#[inline(always)]
pub(crate) fn debug_log() -> bool {
    config().is_some_and(|c| c.debug_log != 0)
}

#[inline(always)]
fn config() -> Option<&'static KernelConfig> {
    CONFIG.get(0)
}

/// Whether the calling task and its TCP socket are ones Guard must monitor.
#[inline(always)]
unsafe fn caller_in_scope(ctx: &SockAddrContext, cfg: &KernelConfig) -> bool {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    if (*sa).type_ != SOCK_STREAM {
        return false;
    }
    task_in_scope(ctx, cfg)
}

/// Whether the calling task and its socket (of any type) are ones Guard
/// must monitor.
#[inline(always)]
unsafe fn task_in_scope(ctx: &SockAddrContext, cfg: &KernelConfig) -> bool {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid == cfg.agent_tgid {
        return false;
    }
    let sk = (*sa).__bindgen_anon_1.sk;
    if !sk.is_null() && cfg.agent_mark != 0 && (*sk).mark == cfg.agent_mark {
        return false;
    }
    if cfg.uid_filter != 0 {
        let uid = bpf_get_current_uid_gid() as u32;
        if SCOPE_UIDS.get(&uid).is_none() {
            return false;
        }
    }
    !cgroup_excluded() && agent_alive()
}

#[inline(always)]
fn destination_in_scope(dst: &SockAddrKey) -> bool {
    let key = Key::new(128, dst.addr);
    matches!(DEST_SCOPE.get(&key), Some(v) if *v == SCOPE_INTERCEPT)
}

/// Where a socket was going and who asked, now.
#[inline(always)]
unsafe fn original_dst(dst: SockAddrKey, family: u32) -> OriginalDst {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    OriginalDst {
        dst,
        family,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        _pad: 0,
        cgroup_id: bpf_get_current_cgroup_id(),
        connect_ns: bpf_ktime_get_ns(),
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

/// Saves where the socket was going and who asked, by socket cookie.
#[inline(always)]
unsafe fn remember(ctx: &SockAddrContext, dst: SockAddrKey, family: u32) -> bool {
    let entry = original_dst(dst, family);
    let cookie = bpf_get_socket_cookie(ctx.sock_addr as *mut _);
    if ORIG_BY_COOKIE.insert(&cookie, &entry, 0).is_err() {
        warn!(ctx, "guard: could not save the destination of tgid {}; not redirected", entry.tgid);
        return false;
    }
    true
}

#[cgroup_sock_addr(connect4)]
pub fn guard_connect4(ctx: SockAddrContext) -> i32 {
    if let Some(verdict) = unsafe { udp::connect4(&ctx) } {
        return verdict;
    }
    unsafe { try_connect4(&ctx) };
    ALLOW
}

// Not inlined: the TCP and UDP paths each get their own stack frame
// (the verifier limits the combined stack of a call chain to 512 bytes).
#[inline(never)]
unsafe fn try_connect4(ctx: &SockAddrContext) {
    let Some(cfg) = config() else { return };
    if cfg.listen_v4_port == 0 || !caller_in_scope(ctx, cfg) {
        return;
    }
    let sa = ctx.sock_addr;
    let ip = (*sa).user_ip4.to_ne_bytes();
    let port = u16::from_be((*sa).user_port as u16);
    if port == 0 || (ip == cfg.listen_v4 && port == cfg.listen_v4_port) {
        return;
    }
    let dst = SockAddrKey::from_v4(ip, port);
    let wanted = destination_in_scope(&dst) || udp::dns_over_tcp_redirected(port);
    if !wanted || !remember(ctx, dst, AF_INET) {
        return;
    }
    (*sa).user_ip4 = u32::from_ne_bytes(cfg.listen_v4);
    (*sa).user_port = cfg.listen_v4_port.to_be() as u32;
    if debug_log() {
        debug!(ctx, "guard: redirected a connect4 to port {}", port);
    }
}

#[cgroup_sock_addr(connect6)]
pub fn guard_connect6(ctx: SockAddrContext) -> i32 {
    if let Some(verdict) = unsafe { udp::connect6(&ctx) } {
        return verdict;
    }
    unsafe { try_connect6(&ctx) };
    ALLOW
}

#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let x = w[i].to_ne_bytes();
        b[i * 4] = x[0];
        b[i * 4 + 1] = x[1];
        b[i * 4 + 2] = x[2];
        b[i * 4 + 3] = x[3];
        i += 1;
    }
    b
}

#[inline(always)]
fn bytes_to_word(b: &[u8; 16], i: usize) -> u32 {
    u32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]])
}

#[inline(always)]
fn is_v4_mapped(b: &[u8; 16]) -> bool {
    b[0] == 0 && b[1] == 0 && b[2] == 0 && b[3] == 0 && b[4] == 0 && b[5] == 0
        && b[6] == 0 && b[7] == 0 && b[8] == 0 && b[9] == 0 && b[10] == 0xff && b[11] == 0xff
}

// Not inlined: the TCP and UDP paths each get their own stack frame
// (the verifier limits the combined stack of a call chain to 512 bytes).
#[inline(never)]
unsafe fn try_connect6(ctx: &SockAddrContext) {
    let Some(cfg) = config() else { return };
    if !caller_in_scope(ctx, cfg) {
        return;
    }
    let sa = ctx.sock_addr;
    let ip = words_to_bytes([
        (*sa).user_ip6[0],
        (*sa).user_ip6[1],
        (*sa).user_ip6[2],
        (*sa).user_ip6[3],
    ]);
    let port = u16::from_be((*sa).user_port as u16);
    if port == 0 {
        return;
    }
    let mapped = is_v4_mapped(&ip);
    // Where the redirect goes: a v6 socket talking to an IPv4 peer goes to
    // the IPv4 listener through its mapped address.
    let (listen, listen_port) = if mapped {
        (SockAddrKey::from_v4(cfg.listen_v4, 0).addr, cfg.listen_v4_port)
    } else {
        (cfg.listen_v6, cfg.listen_v6_port)
    };
    if listen_port == 0 || (ip == listen && port == listen_port) {
        return;
    }
    let dst = SockAddrKey::from_v6(ip, port);
    let wanted = destination_in_scope(&dst) || udp::dns_over_tcp_redirected(port);
    if !wanted || !remember(ctx, dst, AF_INET6) {
        return;
    }
    (*sa).user_ip6[0] = bytes_to_word(&listen, 0);
    (*sa).user_ip6[1] = bytes_to_word(&listen, 1);
    (*sa).user_ip6[2] = bytes_to_word(&listen, 2);
    (*sa).user_ip6[3] = bytes_to_word(&listen, 3);
    (*sa).user_port = listen_port.to_be() as u32;
    if debug_log() {
        debug!(ctx, "guard: redirected a connect6 to port {}", port);
    }
}

#[sock_ops]
pub fn guard_sockops(ctx: SockOpsContext) -> u32 {
    unsafe { try_sockops(&ctx) };
    0
}

unsafe fn try_sockops(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return;
    }
    let cookie = bpf_get_socket_cookie(ctx.ops as *mut _);
    let Some(entry) = ORIG_BY_COOKIE.get(&cookie) else { return };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // Ask for state changes so the cookie entry goes away on close,
        // whether or not the connection is ever established.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        let local_port = ctx.local_port() as u16; // host order in sock_ops
        let key = if ctx.family() == AF_INET {
            SockAddrKey::from_v4(ctx.local_ip4().to_ne_bytes(), local_port)
        } else {
            SockAddrKey::from_v6(words_to_bytes(ctx.local_ip6()), local_port)
        };
        let copy = *entry;
        if ORIG_BY_PEER.insert(&key, &copy, 0).is_err() {
            warn!(ctx, "guard: could not publish a redirected connection of tgid {}", copy.tgid);
        }
    } else if ctx.arg(1) == BPF_TCP_CLOSE {
        let _ = ORIG_BY_COOKIE.remove(&cookie);
    }
}

/// Gives the application back the peer it connected to.
#[inline(always)]
unsafe fn original_for(ctx: &SockAddrContext) -> Option<&'static OriginalDst> {
    let cookie = bpf_get_socket_cookie(ctx.sock_addr as *mut _);
    ORIG_BY_COOKIE
        .get(&cookie)
        .or_else(|| udp::dns_original(cookie))
}

#[cgroup_sock_addr(getpeername4)]
pub fn guard_getpeername4(ctx: SockAddrContext) -> i32 {
    unsafe {
        if let Some(orig) = original_for(&ctx) {
            let a = orig.dst.addr;
            let sa = ctx.sock_addr;
            (*sa).user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
            (*sa).user_port = orig.dst.port.to_be() as u32;
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn guard_getpeername6(ctx: SockAddrContext) -> i32 {
    unsafe {
        if let Some(orig) = original_for(&ctx) {
            let a = orig.dst.addr;
            let sa = ctx.sock_addr;
            (*sa).user_ip6[0] = bytes_to_word(&a, 0);
            (*sa).user_ip6[1] = bytes_to_word(&a, 1);
            (*sa).user_ip6[2] = bytes_to_word(&a, 2);
            (*sa).user_ip6[3] = bytes_to_word(&a, 3);
            (*sa).user_port = orig.dst.port.to_be() as u32;
        }
    }
    ALLOW
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
