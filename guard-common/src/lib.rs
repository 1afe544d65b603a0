//! Types that cross the kernel/user boundary.
//!
//! Every type here is `#[repr(C)]`, has no padding holes the verifier could
//! trip over, and is plain old data: the kernel programs (`guard-ebpf`) write
//! them into maps and the agent (`guard-agent`) reads them back. Addresses are
//! always stored as 16 bytes: IPv4 as an IPv4-mapped IPv6 address
//! (`::ffff:a.b.c.d`), so one key type serves both families and a v6 socket
//! talking to a v4 peer gets the same key as a v4 socket.
//!
//! This crate must never depend on `std` or on anything that cannot build for
//! `bpfel-unknown-none`; the `user` feature only adds `aya::Pod` impls.
#![no_std]

/// Length of a task's `comm`.
pub const COMM_LEN: usize = 16;

/// A socket address in map form: 16-byte address (IPv4 mapped into IPv6) and
/// a port in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAddrKey {
    /// The address; IPv4 as `::ffff:a.b.c.d`, bytes in network order.
    pub addr: [u8; 16],
    /// Port in host byte order.
    pub port: u16,
    /// Always zero: explicit padding so the key has no uninitialised bytes.
    pub _pad: [u8; 6],
}

impl SockAddrKey {
    /// Builds a key from an IPv4 address given as its four bytes.
    pub const fn from_v4(octets: [u8; 4], port: u16) -> Self {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        Self {
            addr,
            port,
            _pad: [0; 6],
        }
    }

    /// Builds a key from an IPv6 address given as its sixteen bytes.
    pub const fn from_v6(addr: [u8; 16], port: u16) -> Self {
        Self {
            addr,
            port,
            _pad: [0; 6],
        }
    }
}

/// What the kernel knew about a redirected connection when it was made: the
/// destination the application asked for and the task that asked.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OriginalDst {
    /// The destination the application passed to `connect()`.
    pub dst: SockAddrKey,
    /// Address family the application's socket used (`AF_INET` or `AF_INET6`).
    pub family: u32,
    /// Thread id of the caller.
    pub pid: u32,
    /// Process id (thread group id) of the caller.
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub _pad: u32,
    /// cgroup v2 id of the caller (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    /// Monotonic kernel time of the `connect()` call, in nanoseconds.
    pub connect_ns: u64,
    pub comm: [u8; COMM_LEN],
}

/// Scope decision values stored in the destination LPM tries.
pub const SCOPE_INTERCEPT: u8 = 1;
/// See [`SCOPE_INTERCEPT`]; the longest matching prefix wins.
pub const SCOPE_EXCLUDE: u8 = 2;

/// The agent's settings for the kernel programs, one entry in `CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelConfig {
    /// The agent's IPv4 listener, address bytes in network order.
    pub listen_v4: [u8; 4],
    /// Port of the IPv4 listener in host order; 0 = no IPv4 redirect.
    pub listen_v4_port: u16,
    /// Port of the IPv6 listener in host order; 0 = no IPv6 redirect.
    pub listen_v6_port: u16,
    /// The agent's IPv6 listener, bytes in network order.
    pub listen_v6: [u8; 16],
    /// The agent's process id: its sockets are never redirected.
    pub agent_tgid: u32,
    /// `SO_MARK` the agent puts on its upstream sockets: never redirected.
    pub agent_mark: u32,
    /// Non-zero: only redirect sockets of uids present in `SCOPE_UIDS`.
    pub uid_filter: u32,
    /// Non-zero: log every redirect (debug level). Off unless the agent
    /// logs `guard_ebpf` at debug: each record wakes the agent's log reader,
    /// a cost on every connection's path.
    pub debug_log: u32,
}

// ---------------------------------------------------------------------------
// DNS and UDP (guard-ebpf/src/udp.rs, guard-agent/src/dns/)
// ---------------------------------------------------------------------------

/// Port whose UDP datagrams (and UDP `connect()`s) go to the agent's resolver.
pub const DNS_PORT: u16 = 53;

/// Verdicts stored in `UDP_RULES`: the longest matching (port, prefix) wins.
pub const UDP_BLOCK: u8 = 1;
/// See [`UDP_BLOCK`]: an exception carved out of a wider block.
pub const UDP_ALLOW: u8 = 2;

/// Length of a `UDP_RULES` key's data: 2 bytes of port (network order, 0 =
/// any port) then 16 bytes of address (IPv4 mapped into IPv6).
pub const UDP_RULE_KEY_LEN: usize = 18;

/// Builds the data part of a `UDP_RULES` LPM key.
pub const fn udp_rule_key(port: u16, addr: [u8; 16]) -> [u8; UDP_RULE_KEY_LEN] {
    let mut k = [0u8; UDP_RULE_KEY_LEN];
    let p = port.to_be_bytes();
    k[0] = p[0];
    k[1] = p[1];
    let mut i = 0;
    while i < 16 {
        k[2 + i] = addr[i];
        i += 1;
    }
    k
}

/// Where the agent's resolver listens, one entry in `DNS_CONFIG`. A zero port
/// means no resolver on that family: DNS of that family is left alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DnsConfig {
    /// The resolver's IPv4 address, bytes in network order.
    pub resolver_v4: [u8; 4],
    /// Port of the IPv4 resolver in host order.
    pub resolver_v4_port: u16,
    /// Port of the IPv6 resolver in host order.
    pub resolver_v6_port: u16,
    /// The resolver's IPv6 address, bytes in network order.
    pub resolver_v6: [u8; 16],
}

// Fail mode and scope exclusions (maps `LIVENESS` and `EXCLUDED_CGROUPS`).
// ---------------------------------------------------------------------------

/// The agent's heartbeat and fail mode, one entry in `LIVENESS`.
///
/// The agent writes `heartbeat_ns` about once a second with the monotonic
/// clock `bpf_ktime_get_ns()` reads (`CLOCK_MONOTONIC`). With
/// `fail_open_after_ns == 0` (enforce, the default) the connect programs
/// redirect whether or not the agent is alive: a dead agent means refused
/// connections. Otherwise they stop redirecting once the heartbeat is older
/// than `fail_open_after_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AgentLiveness {
    /// `CLOCK_MONOTONIC` time of the agent's last heartbeat, nanoseconds.
    pub heartbeat_ns: u64,
    /// 0: fail closed; otherwise the heartbeat age after which connects go
    /// direct, nanoseconds.
    pub fail_open_after_ns: u64,
}

/// How many cgroup levels below the root the connect programs walk when
/// they look for an excluded ancestor: an excluded cgroup must sit at most
/// this deep (the root is level 0, `/sys/fs/cgroup/a` is level 1).
pub const MAX_EXCLUDED_CGROUP_LEVEL: u32 = 16;

/// Value stored in `EXCLUDED_CGROUPS` for an excluded cgroup id.
pub const CGROUP_EXCLUDED: u8 = 1;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] plain data with explicit padding.
    unsafe impl aya::Pod for super::SockAddrKey {}
    unsafe impl aya::Pod for super::OriginalDst {}
    unsafe impl aya::Pod for super::KernelConfig {}
    unsafe impl aya::Pod for super::DnsConfig {}
    unsafe impl aya::Pod for super::AgentLiveness {}
}
