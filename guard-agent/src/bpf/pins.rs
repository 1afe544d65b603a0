//! Pinned attachments: what keeps Guard's kernel programs attached while the
//! agent is down, and how a new agent finds and replaces them.
//!
//! Every attachment is a cgroup `bpf_link` pinned in bpffs, so it outlives
//! the process that made it. One agent instance (one state directory) owns
//! one directory:
//!
//! ```text
//! /sys/fs/bpf/guard/<instance>/            instance = first 16 hex digits of
//!                                          sha256(canonical state dir path)
//!   gen-<pid>-<unix ns>/                   one agent run (a "generation")
//!     <cgroup id>-<program>                one pinned link per cgroup and program
//!                                          (bpffs refuses dots in names)
//! ```
//!
//! A clean stop detaches and unlinks its generation; a crash or a handover
//! leaves it in place (its programs keep redirecting to a listener that is
//! gone: connects are refused). A new agent attaches its own generation
//! first, then detaches every older one, so there is no moment without
//! programs.
//!
//! aya 0.13 cannot turn a cgroup sock_addr / sock_ops link into a pinnable
//! one, so the three `bpf(2)` commands needed (LINK_CREATE, OBJ_PIN/OBJ_GET,
//! LINK_DETACH) are issued here directly. This module must never touch a
//! pin outside `/sys/fs/bpf/guard/<instance>/` of its own state directory.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

/// Where bpffs is (or is mounted by the agent).
pub const BPFFS: &str = "/sys/fs/bpf";

/// `enum bpf_cmd` values from `linux/bpf.h`.
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_DETACH: libc::c_long = 34;

/// The `bpf_attach_type` for a Guard program, from the hook its name ends
/// with (`guard_connect4` → `BPF_CGROUP_INET4_CONNECT`).
pub fn attach_type(program: &str) -> Option<u32> {
    // Values from `enum bpf_attach_type` in linux/bpf.h.
    const TABLE: [(&str, u32); 10] = [
        ("dns_egress", 1), // BPF_CGROUP_INET_EGRESS (cgroup_skb)
        ("sockops", 3),
        ("connect4", 10),
        ("connect6", 11),
        ("sendmsg4", 14),
        ("sendmsg6", 15),
        ("recvmsg4", 19),
        ("recvmsg6", 20),
        ("getpeername4", 29),
        ("getpeername6", 30),
    ];
    TABLE
        .iter()
        .find(|(suffix, _)| program.ends_with(suffix))
        .map(|(_, t)| *t)
}

/// The bpffs directory of the agent instance that uses `state_dir`.
pub fn instance_dir(state_dir: &Path) -> PathBuf {
    let canonical = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    let digest = Sha256::digest(canonical.as_os_str().as_bytes());
    let id: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Path::new(BPFFS).join("guard").join(id)
}

/// A fresh generation directory name for this process.
pub fn generation_name() -> String {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("gen-{}-{ns}", std::process::id())
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Makes sure bpffs is mounted at [`BPFFS`] (mounts it when it is not; two
/// agents starting at once serialise on a lock file so it is mounted once).
pub fn ensure_bpffs() -> io::Result<()> {
    if is_bpffs(Path::new(BPFFS)) {
        return Ok(());
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/guard-bpffs.lock")?;
    let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io::Error::from(e))?;
    if is_bpffs(Path::new(BPFFS)) {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS)?;
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some("mode=0700"),
    )
    .map_err(io::Error::from)?;
    tracing::info!("mounted bpffs at {BPFFS}");
    Ok(())
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a #[repr(C)] prefix of `union bpf_attr` for `cmd`,
    // fully initialised; the kernel reads at most size_of::<T>() bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// Creates a cgroup link of `prog` on `cgroup` (multi-attach).
pub fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: attach,
        flags: 0,
    };
    let fd = sys_bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a pin path"))
}

/// Pins a BPF object (here: a link) at `path` in bpffs.
pub fn pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let p = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: p.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    sys_bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Opens a pinned BPF object.
pub fn open_pin(path: &Path) -> io::Result<OwnedFd> {
    let p = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: p.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Detaches a link from its cgroup now, whoever else holds it.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    sys_bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// One pinned link this agent made.
#[derive(Debug)]
pub struct PinnedLink {
    pub cgroup: PathBuf,
    pub program: &'static str,
    pub path: PathBuf,
    pub fd: OwnedFd,
}

impl PinnedLink {
    /// Detaches the link and removes its pin.
    pub fn release(self) -> io::Result<()> {
        let detached = link_detach(self.fd.as_fd());
        let unpinned = std::fs::remove_file(&self.path);
        detached.and(unpinned)
    }
}

/// Generation directories in `instance` other than `mine`, oldest first.
pub fn other_generations(instance: &Path, mine: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(instance)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("gen-") && n != mine
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// Detaches and unpins every link of a generation directory, then removes
/// it. Returns how many links it detached.
pub fn remove_generation(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        match open_pin(&path) {
            Ok(fd) => {
                if let Err(e) = link_detach(fd.as_fd()) {
                    tracing::warn!(pin = %path.display(), "cannot detach a stale link: {e}");
                } else {
                    n += 1;
                }
            }
            Err(e) => tracing::warn!(pin = %path.display(), "cannot open a stale pin: {e}"),
        }
        std::fs::remove_file(&path)?;
    }
    std::fs::remove_dir(dir)?;
    Ok(n)
}

/// Detaches every link that agents of `state_dir` left pinned (after a
/// crash or a handover stop) and removes their pins. Returns how many links
/// it detached. Only for when no agent of `state_dir` runs.
pub fn release_instance(state_dir: &Path) -> io::Result<usize> {
    let instance = instance_dir(state_dir);
    let mut n = 0;
    for dir in other_generations(&instance, "") {
        n += remove_generation(&dir)?;
    }
    remove_empty_dirs(&instance);
    Ok(n)
}

/// Removes the instance directory when empty. `/sys/fs/bpf/guard` itself
/// stays: another instance may be creating its directory in it right now.
pub fn remove_empty_dirs(instance: &Path) {
    let _ = std::fs::remove_dir(instance);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_types_follow_the_hook_in_the_name() {
        assert_eq!(attach_type("guard_connect4"), Some(10));
        assert_eq!(attach_type("guard_getpeername6"), Some(30));
        assert_eq!(attach_type("guard_sockops"), Some(3));
        assert_eq!(attach_type("guard_dns_egress"), Some(1));
        assert_eq!(attach_type("guard_sendmsg6"), Some(15));
        assert_eq!(attach_type("guard_other"), None);
    }

    #[test]
    fn each_state_dir_has_its_own_instance_dir() {
        let a = instance_dir(Path::new("/nonexistent/a"));
        let b = instance_dir(Path::new("/nonexistent/b"));
        assert_ne!(a, b);
        assert!(a.starts_with("/sys/fs/bpf/guard"));
        assert_eq!(a, instance_dir(Path::new("/nonexistent/a")));
    }
}
