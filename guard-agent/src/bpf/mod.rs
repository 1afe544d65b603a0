//! Loads Guard's kernel programs, fills their maps from the configuration,
//! attaches them to the monitored cgroups, and answers "where was this
//! accepted connection going, and who made it?".
//!
//! Attachments are `bpf_link`s owned by this process: when the agent exits,
//! cleanly or not, the kernel detaches them and monitored processes connect
//! directly again; nothing is pinned. Kernel log records (aya-log) are
//! forwarded to `tracing` under the target `guard_ebpf`.
//!
//! This module must never attach to a cgroup it was not given, and never
//! write the destination maps with anything but the validated scope.

use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps},
    Ebpf, EbpfLoader,
};
use guard_common::{KernelConfig, OriginalDst, SockAddrKey, SCOPE_EXCLUDE, SCOPE_INTERCEPT};
use ipnet::IpNet;

use crate::config::AgentConfig;

pub mod udp;

/// The compiled kernel programs, embedded at build time. `cargo xtask
/// build-ebpf` rebuilds this file from `guard-ebpf/`.
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!("../../ebpf/guard.bpf.o");

/// The programs and the sections they attach as, in attach order (the
/// ones that redirect last, so that what they redirect is always followed).
pub const PROGRAMS: [&str; 10] = [
    "guard_sockops",
    "guard_getpeername4",
    "guard_getpeername6",
    "guard_recvmsg4",
    "guard_recvmsg6",
    "guard_dns_egress",
    "guard_sendmsg4",
    "guard_sendmsg6",
    "guard_connect4",
    "guard_connect6",
];

/// Kernel programs failed to load or attach.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("cannot load Guard's kernel programs: {0}. The kernel needs BPF with cgroup v2 hooks (connect4/6, getpeername4/6, sock_ops; Linux 5.8 or later) and the agent needs root (CAP_BPF, CAP_NET_ADMIN)")]
    Load(#[source] aya::EbpfError),
    #[error("the kernel refused program `{program}`: {source}. This kernel may lack the hook (getpeername needs Linux 5.8+)")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot attach `{program}` to cgroup {cgroup}: {source}")]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot open cgroup {cgroup}: {source}")]
    OpenCgroup {
        cgroup: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel map `{map}`: {message}")]
    Map { map: &'static str, message: String },
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> BpfError {
    move |e| BpfError::Map {
        map,
        message: e.to_string(),
    }
}

/// Loaded and attached kernel programs. Dropping this detaches everything.
pub struct KernelPrograms {
    ebpf: Ebpf,
    attached: Vec<PathBuf>,
}

/// Reads (and consumes) the original destination of accepted connections.
pub struct OriginalDstTable {
    map: Mutex<HashMap<MapData, SockAddrKey, OriginalDst>>,
}

/// The map key for a peer address as the agent sees it on `accept()`.
pub fn peer_key(peer: SocketAddr) -> SockAddrKey {
    match peer.ip() {
        IpAddr::V4(v4) => SockAddrKey::from_v4(v4.octets(), peer.port()),
        IpAddr::V6(v6) => SockAddrKey::from_v6(v6.octets(), peer.port()),
    }
}

/// An address as a 16-byte map address (IPv4 mapped into IPv6) and the
/// matching prefix length.
fn lpm_key(net: &IpNet) -> Key<[u8; 16]> {
    match net {
        IpNet::V4(n) => Key::new(
            96 + u32::from(n.prefix_len()),
            n.network().to_ipv6_mapped().octets(),
        ),
        IpNet::V6(n) => Key::new(u32::from(n.prefix_len()), n.network().octets()),
    }
}

/// Destinations never intercepted unless a longer (more specific) intercept
/// prefix says so: loopback and link-local.
pub const DEFAULT_EXCLUDES: [&str; 4] = ["127.0.0.0/8", "169.254.0.0/16", "::1/128", "fe80::/10"];

impl OriginalDstTable {
    /// Looks up and removes the entry for an accepted connection's peer.
    pub fn take(&self, peer: SocketAddr) -> Option<OriginalDst> {
        let key = peer_key(peer);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let v = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(v)
    }
}

impl KernelPrograms {
    /// Loads the programs and fills the configuration and scope maps.
    /// Returns the programs and the table the accept path reads.
    pub fn load(cfg: &AgentConfig) -> Result<(Self, OriginalDstTable), BpfError> {
        let mut ebpf = EbpfLoader::new()
            .load(KERNEL_OBJECT)
            .map_err(BpfError::Load)?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(_) => {}
            Err(e) => tracing::warn!("kernel log forwarding unavailable: {e}"),
        }

        let kc = kernel_config(cfg);
        let mut config: Array<_, KernelConfig> =
            Array::try_from(ebpf.map_mut("CONFIG").ok_or(BpfError::Map {
                map: "CONFIG",
                message: "missing from the object".into(),
            })?)
            .map_err(map_err("CONFIG"))?;
        config.set(0, kc, 0).map_err(map_err("CONFIG"))?;

        let mut scope: LpmTrie<_, [u8; 16], u8> =
            LpmTrie::try_from(ebpf.map_mut("DEST_SCOPE").ok_or(BpfError::Map {
                map: "DEST_SCOPE",
                message: "missing from the object".into(),
            })?)
            .map_err(map_err("DEST_SCOPE"))?;
        for (net, value) in scope_entries(cfg) {
            scope
                .insert(&lpm_key(&net), value, 0)
                .map_err(map_err("DEST_SCOPE"))?;
        }

        Self::fill_udp_maps(&mut ebpf, &crate::dns::listen_addrs(cfg), &cfg.udp)?;

        if !cfg.uids.is_empty() {
            let mut uids: HashMap<_, u32, u8> =
                HashMap::try_from(ebpf.map_mut("SCOPE_UIDS").ok_or(BpfError::Map {
                    map: "SCOPE_UIDS",
                    message: "missing from the object".into(),
                })?)
                .map_err(map_err("SCOPE_UIDS"))?;
            for uid in &cfg.uids {
                uids.insert(uid, 1, 0).map_err(map_err("SCOPE_UIDS"))?;
            }
        }

        for name in PROGRAMS {
            let prog = ebpf.program_mut(name).ok_or(BpfError::Map {
                map: "programs",
                message: format!("program {name} missing from the object"),
            })?;
            let res = match prog {
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                aya::programs::Program::SockOps(p) => p.load(),
                aya::programs::Program::CgroupSkb(p) => p.load(),
                _ => unreachable!("guard programs are sock_addr, sock_ops or cgroup_skb"),
            };
            res.map_err(|source| BpfError::Program {
                program: name,
                source,
            })?;
        }

        let peer_map = ebpf.take_map("ORIG_BY_PEER").ok_or(BpfError::Map {
            map: "ORIG_BY_PEER",
            message: "missing from the object".into(),
        })?;
        let table = OriginalDstTable {
            map: Mutex::new(HashMap::try_from(peer_map).map_err(map_err("ORIG_BY_PEER"))?),
        };
        Ok((
            Self {
                ebpf,
                attached: Vec::new(),
            },
            table,
        ))
    }

    /// Attaches every program to one cgroup directory. On kernels with
    /// `bpf_link` (5.7+) the attachment is a link, which coexists with other
    /// programs on the same cgroup; the "Single" mode means no legacy flags.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), BpfError> {
        for name in PROGRAMS {
            let file = File::open(cgroup).map_err(|source| BpfError::OpenCgroup {
                cgroup: cgroup.to_owned(),
                source,
            })?;
            let prog = self.ebpf.program_mut(name).expect("loaded above");
            let res = match prog {
                aya::programs::Program::CgroupSockAddr(p) => {
                    let p: &mut CgroupSockAddr = p;
                    p.attach(&file, CgroupAttachMode::Single).map(drop)
                }
                aya::programs::Program::SockOps(p) => {
                    let p: &mut SockOps = p;
                    p.attach(&file, CgroupAttachMode::Single).map(drop)
                }
                aya::programs::Program::CgroupSkb(p) => {
                    let p: &mut aya::programs::CgroupSkb = p;
                    p.attach(
                        &file,
                        aya::programs::CgroupSkbAttachType::Egress,
                        CgroupAttachMode::Single,
                    )
                    .map(drop)
                }
                _ => unreachable!(),
            };
            res.map_err(|source| BpfError::Attach {
                program: name,
                cgroup: cgroup.to_owned(),
                source,
            })?;
        }
        self.attached.push(cgroup.to_owned());
        Ok(())
    }

    /// The cgroups the programs are attached to.
    pub fn attached(&self) -> &[PathBuf] {
        &self.attached
    }
}

/// The kernel's view of the configuration.
pub fn kernel_config(cfg: &AgentConfig) -> KernelConfig {
    let mut kc = KernelConfig {
        agent_tgid: std::process::id(),
        agent_mark: cfg.mark,
        uid_filter: u32::from(!cfg.uids.is_empty()),
        ..Default::default()
    };
    if let Some(SocketAddr::V4(a)) = cfg.listen_v4 {
        kc.listen_v4 = a.ip().octets();
        kc.listen_v4_port = a.port();
    }
    if let Some(SocketAddr::V6(a)) = cfg.listen_v6 {
        kc.listen_v6 = a.ip().octets();
        kc.listen_v6_port = a.port();
    }
    kc
}

/// The destination scope as LPM entries, in insertion order (later entries
/// with the same prefix win): IPv4 space off by default (so an IPv6 `::/0`
/// does not reach into mapped IPv4), loopback and link-local excluded, then
/// the intercepted prefixes, then the excluded ones.
pub fn scope_entries(cfg: &AgentConfig) -> Vec<(IpNet, u8)> {
    let mut out: Vec<(IpNet, u8)> = Vec::new();
    out.push(("::ffff:0.0.0.0/96".parse().unwrap(), SCOPE_EXCLUDE));
    for d in DEFAULT_EXCLUDES {
        out.push((d.parse().unwrap(), SCOPE_EXCLUDE));
    }
    out.extend(cfg.intercept.iter().map(|n| (*n, SCOPE_INTERCEPT)));
    out.extend(cfg.exclude.iter().map(|n| (*n, SCOPE_EXCLUDE)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_prefixes_are_mapped() {
        let k = lpm_key(&"10.1.0.0/16".parse().unwrap());
        assert_eq!(k.prefix_len(), 112);
        assert_eq!(&k.data()[10..14], &[0xff, 0xff, 10, 1]);
    }

    #[test]
    fn peer_keys_match_the_kernel_layout() {
        let k = peer_key("127.0.0.1:4242".parse().unwrap());
        assert_eq!(k, SockAddrKey::from_v4([127, 0, 0, 1], 4242));
        let k6 = peer_key("[::1]:80".parse().unwrap());
        assert_eq!(k6.addr[15], 1);
        assert_eq!(k6.port, 80);
    }
}
