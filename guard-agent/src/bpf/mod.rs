//! Loads Guard's kernel programs, fills their maps from the configuration,
//! attaches them to the monitored cgroups, and answers "where was this
//! accepted connection going, and who made it?".
//!
//! Attachments are `bpf_link`s pinned in bpffs (see [`pins`]): they outlive
//! the agent. A clean stop ([`KernelPrograms::release`]) detaches them and
//! monitored processes connect directly again; a crash or a handover leaves
//! them attached, so monitored connects are refused (fail closed) unless a
//! fail-open window is set and the heartbeat ([`liveness`]) goes stale. A new
//! agent attaches its own links first and then removes the ones it finds
//! from earlier runs of the same state directory. Kernel log records
//! (aya-log) are forwarded to `tracing` under the target `guard_ebpf`.
//!
//! This module must never attach to a cgroup it was not given, and never
//! write the destination maps with anything but the validated scope.

pub mod liveness;
pub mod pins;

use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, IterableMap, LpmTrie, MapData},
    Ebpf, EbpfLoader,
};
use guard_common::{
    AgentLiveness, KernelConfig, OriginalDst, SockAddrKey, CGROUP_EXCLUDED, SCOPE_EXCLUDE,
    SCOPE_INTERCEPT,
};
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
    #[error("pinned attachments under {path}: {source} (is bpffs available at /sys/fs/bpf?)")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> BpfError {
    move |e| BpfError::Map {
        map,
        message: e.to_string(),
    }
}

/// Loaded and attached kernel programs. Dropping this leaves the pinned
/// attachments in place (crash and handover semantics); only
/// [`KernelPrograms::release`] detaches them.
pub struct KernelPrograms {
    ebpf: Ebpf,
    attached: Vec<PathBuf>,
    heartbeat: Arc<liveness::Heartbeat>,
    /// `/sys/fs/bpf/guard/<instance>`.
    instance: PathBuf,
    /// This run's generation directory inside `instance`.
    generation: PathBuf,
    links: Vec<pins::PinnedLink>,
}

/// A read-only view of the attachments for `status`.
pub struct AttachmentView {
    pub heartbeat: Arc<liveness::Heartbeat>,
    /// `/sys/fs/bpf/guard/<instance>`.
    pub pin_dir: PathBuf,
    /// Each scope cgroup and the pin paths of its links.
    scopes: Vec<(PathBuf, Vec<PathBuf>)>,
}

/// Attachment state of one scope cgroup, for `status`.
#[derive(Debug, Clone)]
pub struct ScopeAttachment {
    pub cgroup: PathBuf,
    /// Links this agent made on the cgroup.
    pub links: usize,
    /// Every one of them is still pinned in bpffs (so it stays attached if
    /// the agent dies).
    pub pinned: bool,
}

impl AttachmentView {
    /// Per scope cgroup: links made and whether they are all still pinned.
    pub fn scopes(&self) -> Vec<ScopeAttachment> {
        self.scopes
            .iter()
            .map(|(cgroup, pins)| ScopeAttachment {
                cgroup: cgroup.clone(),
                links: pins.len(),
                pinned: !pins.is_empty() && pins.iter().all(|p| p.exists()),
            })
            .collect()
    }
}

/// Reads (and consumes) the original destination of accepted connections.
pub struct OriginalDstTable {
    map: Mutex<HashMap<MapData, SockAddrKey, OriginalDst>>,
    /// Whether the kernel takes an entry in one call (Linux 5.14+); cleared
    /// on the first refusal, then a lookup and a delete are used.
    one_call: std::sync::atomic::AtomicBool,
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
        use std::sync::atomic::Ordering::Relaxed;
        let key = peer_key(peer);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if self.one_call.load(Relaxed) {
            match lookup_and_delete(map.map().fd().as_fd(), &key) {
                Ok(v) => return v,
                Err(e) if is_unsupported(&e) => {
                    tracing::debug!("BPF_MAP_LOOKUP_AND_DELETE_ELEM unsupported ({e}): two calls per connection");
                    self.one_call.store(false, Relaxed);
                }
                Err(_) => return None,
            }
        }
        let v = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(v)
    }
}

/// `bpf(2)` command number of BPF_MAP_LOOKUP_AND_DELETE_ELEM.
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The map element part of `union bpf_attr`.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Reads and removes one entry in a single syscall; `Ok(None)` when absent.
fn lookup_and_delete(
    map: std::os::fd::BorrowedFd<'_>,
    key: &SockAddrKey,
) -> std::io::Result<Option<OriginalDst>> {
    use std::os::fd::AsRawFd;
    let mut value = std::mem::MaybeUninit::<OriginalDst>::zeroed();
    let attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const SockAddrKey as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: attr points to key and value buffers of the map's key and
    // value sizes (the map is declared with these types on both sides),
    // both alive for the call.
    let r = unsafe { bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &attr) };
    if r == 0 {
        // SAFETY: the kernel filled the value; OriginalDst is plain data
        // for which every bit pattern (zeroed to start with) is valid.
        return Ok(Some(unsafe { value.assume_init() }));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// `bpf(2)` with `attr` as the command's part of `union bpf_attr`.
///
/// # Safety
/// `attr` must be laid out as the kernel expects for `cmd`, and every
/// pointer in it valid for what `cmd` reads or writes through it.
unsafe fn bpf<A>(cmd: libc::c_long, attr: &A) -> libc::c_long {
    libc::syscall(
        libc::SYS_bpf,
        cmd,
        attr as *const A,
        std::mem::size_of::<A>(),
    )
}

/// The kernel does not know the command for this map type.
fn is_unsupported(e: &std::io::Error) -> bool {
    /// The kernel's internal ENOTSUPP, which bpf(2) can leak.
    const ENOTSUPP: i32 = 524;
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
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

        let mut excluded: HashMap<_, u64, u8> =
            HashMap::try_from(ebpf.map_mut("EXCLUDED_CGROUPS").ok_or(BpfError::Map {
                map: "EXCLUDED_CGROUPS",
                message: "missing from the object".into(),
            })?)
            .map_err(map_err("EXCLUDED_CGROUPS"))?;
        for c in &cfg.exclude_cgroups {
            let id = std::fs::metadata(c)
                .map_err(|source| BpfError::OpenCgroup {
                    cgroup: c.clone(),
                    source,
                })?
                .ino();
            excluded
                .insert(id, CGROUP_EXCLUDED, 0)
                .map_err(map_err("EXCLUDED_CGROUPS"))?;
        }

        let liveness: Array<_, AgentLiveness> =
            Array::try_from(ebpf.take_map("LIVENESS").ok_or(BpfError::Map {
                map: "LIVENESS",
                message: "missing from the object".into(),
            })?)
            .map_err(map_err("LIVENESS"))?;
        let heartbeat = Arc::new(liveness::Heartbeat::new(liveness, cfg.fail_open_after));
        // Fresh before anything is attached, so fail-open starts closed.
        heartbeat.beat().map_err(map_err("LIVENESS"))?;

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
            one_call: std::sync::atomic::AtomicBool::new(true),
        };
        let instance = pins::instance_dir(&cfg.state_dir);
        let generation = instance.join(pins::generation_name());
        let pin_err = |path: &Path| {
            let path = path.to_owned();
            move |source| BpfError::Pin { path, source }
        };
        pins::ensure_bpffs().map_err(pin_err(Path::new(pins::BPFFS)))?;
        std::fs::create_dir_all(&generation).map_err(pin_err(&generation))?;
        Ok((
            Self {
                ebpf,
                attached: Vec::new(),
                heartbeat,
                instance,
                generation,
                links: Vec::new(),
            },
            table,
        ))
    }

    /// Attaches every program to one cgroup directory with `bpf_link`s
    /// (multi-attach: they coexist with other programs on the cgroup) and
    /// pins each link in this run's generation directory.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), BpfError> {
        let file = File::open(cgroup).map_err(|source| BpfError::OpenCgroup {
            cgroup: cgroup.to_owned(),
            source,
        })?;
        let cgroup_id = file
            .metadata()
            .map_err(|source| BpfError::OpenCgroup {
                cgroup: cgroup.to_owned(),
                source,
            })?
            .ino();
        for name in PROGRAMS {
            let attach_err = |source: std::io::Error| BpfError::Attach {
                program: name,
                cgroup: cgroup.to_owned(),
                source: aya::programs::ProgramError::IOError(source),
            };
            let attach = pins::attach_type(name).ok_or_else(|| {
                attach_err(std::io::Error::other(
                    "no attach type known for this program",
                ))
            })?;
            let prog = self.ebpf.program(name).expect("loaded above");
            let fd = match prog {
                aya::programs::Program::CgroupSockAddr(p) => p.fd(),
                aya::programs::Program::SockOps(p) => p.fd(),
                aya::programs::Program::CgroupSkb(p) => p.fd(),
                _ => unreachable!("guard programs are sock_addr, sock_ops or cgroup_skb"),
            }
            .map_err(|source| BpfError::Attach {
                program: name,
                cgroup: cgroup.to_owned(),
                source,
            })?;
            let link = pins::link_create(fd.as_fd(), file.as_fd(), attach).map_err(attach_err)?;
            let path = self.generation.join(format!("{cgroup_id}-{name}"));
            if let Err(source) = pins::pin(link.as_fd(), &path) {
                let _ = pins::link_detach(link.as_fd());
                return Err(BpfError::Pin { path, source });
            }
            self.links.push(pins::PinnedLink {
                cgroup: cgroup.to_owned(),
                program: name,
                path,
                fd: link,
            });
        }
        self.attached.push(cgroup.to_owned());
        Ok(())
    }

    /// Detaches the attachments earlier runs of this state directory left
    /// pinned (after a crash or a handover). Call it once this run's own
    /// programs are attached, so that monitored cgroups are never without
    /// one. Returns how many links were detached.
    pub fn take_over_stale(&self) -> usize {
        let mine = self
            .generation
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut n = 0;
        for dir in pins::other_generations(&self.instance, &mine) {
            match pins::remove_generation(&dir) {
                Ok(k) => {
                    tracing::info!(pins = %dir.display(), links = k, "took over from an earlier agent: its attachments are detached");
                    n += k;
                }
                Err(e) => {
                    tracing::warn!(pins = %dir.display(), "cannot remove stale attachments: {e}")
                }
            }
        }
        n
    }

    /// Clean stop: detaches every attachment of this run and removes its
    /// pins; monitored processes connect directly from now on.
    pub fn release(mut self) {
        for link in self.links.drain(..) {
            let path = link.path.clone();
            if let Err(e) = link.release() {
                tracing::warn!(pin = %path.display(), "cannot release a link: {e}");
            }
        }
        let _ = std::fs::remove_dir(&self.generation);
        pins::remove_empty_dirs(&self.instance);
    }

    /// The heartbeat writer (shared with the heartbeat task and `status`).
    pub fn heartbeat(&self) -> Arc<liveness::Heartbeat> {
        Arc::clone(&self.heartbeat)
    }

    /// The bpffs directory holding this instance's pins.
    pub fn pin_dir(&self) -> &Path {
        &self.instance
    }

    /// What `status` shows about the attachments, fail mode and heartbeat.
    pub fn view(&self) -> AttachmentView {
        AttachmentView {
            heartbeat: Arc::clone(&self.heartbeat),
            pin_dir: self.instance.clone(),
            scopes: self
                .attached
                .iter()
                .map(|c| {
                    let pins = self
                        .links
                        .iter()
                        .filter(|l| &l.cgroup == c)
                        .map(|l| l.path.clone())
                        .collect();
                    (c.clone(), pins)
                })
                .collect(),
        }
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
        debug_log: u32::from(tracing::enabled!(target: "guard_ebpf", tracing::Level::DEBUG)),
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

    /// An LRU hash map of the table's key and value types, made with
    /// bpf(2) directly (needs root, as the agent does).
    fn lru_map() -> std::os::fd::OwnedFd {
        use std::os::fd::FromRawFd;
        #[repr(C)]
        struct CreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        const BPF_MAP_CREATE: libc::c_long = 0;
        const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
        let attr = CreateAttr {
            map_type: BPF_MAP_TYPE_LRU_HASH,
            key_size: std::mem::size_of::<SockAddrKey>() as u32,
            value_size: std::mem::size_of::<OriginalDst>() as u32,
            max_entries: 16,
            map_flags: 0,
        };
        // SAFETY: the start of BPF_MAP_CREATE's attr; no pointers.
        let fd = unsafe { bpf(BPF_MAP_CREATE, &attr) };
        assert!(
            fd >= 0,
            "creating a BPF map (run the tests as root): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: bpf(2) returned a new descriptor that nothing else owns.
        unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
    }

    #[test]
    fn an_entry_is_taken_in_one_call_and_only_once() {
        let map = lru_map();
        let key = peer_key("10.0.0.1:40000".parse().unwrap());
        let value = OriginalDst {
            tgid: 4242,
            uid: 1000,
            ..Default::default()
        };
        let attr = MapElemAttr {
            map_fd: std::os::fd::AsRawFd::as_raw_fd(&map) as u32,
            _pad: 0,
            key: &key as *const SockAddrKey as u64,
            value: &value as *const OriginalDst as u64,
            flags: 0,
        };
        const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
        // SAFETY: attr points to a key and a value of the map's sizes.
        let r = unsafe { bpf(BPF_MAP_UPDATE_ELEM, &attr) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        let got = lookup_and_delete(map.as_fd(), &key)
            .expect("this kernel takes LRU hash entries in one call")
            .expect("the entry is there");
        assert_eq!((got.tgid, got.uid), (4242, 1000));
        assert!(lookup_and_delete(map.as_fd(), &key).unwrap().is_none());
    }

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
