//! cgroup v2 plumbing: where the hierarchy is mounted, which cgroup a process
//! is in, and the monitored cgroups `guard-agent exec` creates.
//!
//! This module only reads `/proc` and creates, fills and removes cgroup
//! directories the agent owns (below its `exec_cgroup`); it never moves a
//! process it was not asked to move by that process itself.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Errors about the cgroup hierarchy.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo for a `cgroup2` filesystem); Guard needs cgroup v2 (on hybrid hosts it is often at /sys/fs/cgroup/unified)")]
    NoCgroup2,
    #[error("{path} is not a directory of the cgroup v2 hierarchy mounted at {mount}")]
    NotInHierarchy { path: PathBuf, mount: PathBuf },
    #[error("cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Finds where cgroup v2 is mounted, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err(Path::new("/proc/self/mountinfo")))?;
    parse_cgroup2_mount(&info).ok_or(CgroupError::NoCgroup2)
}

/// Parses mountinfo text: the mount point of the first `cgroup2` filesystem.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    for line in mountinfo.lines() {
        // id parent maj:min root mountpoint options [optional...] - fstype source superoptions
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2") {
            let mount = left.split_whitespace().nth(4)?;
            return Some(PathBuf::from(unescape_mountinfo(mount)));
        }
    }
    None
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\134", "\\")
}

/// Checks that `path` is a cgroup directory inside the v2 hierarchy.
pub fn check_cgroup_dir(mount: &Path, path: &Path) -> Result<(), CgroupError> {
    if !path.starts_with(mount) || !path.join("cgroup.procs").exists() {
        return Err(CgroupError::NotInHierarchy {
            path: path.to_owned(),
            mount: mount.to_owned(),
        });
    }
    Ok(())
}

/// The cgroup v2 id of a directory: its inode number, which is what
/// `bpf_get_current_cgroup_id()` returns for tasks in it.
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    Ok(fs::metadata(path).map_err(io_err(path))?.ino())
}

/// The cgroup v2 path of a process relative to the hierarchy's root
/// (`/user.slice/...`), from `/proc/PID/cgroup`.
pub fn cgroup_of_pid(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// Creates a cgroup directory (and its parents).
pub fn create(path: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(path).map_err(io_err(path))
}

/// Moves a whole process into a cgroup.
pub fn move_process(path: &Path, pid: u32) -> Result<(), CgroupError> {
    let procs = path.join("cgroup.procs");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .map_err(io_err(&procs))?;
    f.write_all(pid.to_string().as_bytes())
        .map_err(io_err(&procs))
}

/// Whether any process is left in the cgroup or below it.
pub fn is_populated(path: &Path) -> bool {
    fs::read_to_string(path.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// Removes an empty cgroup directory; children first.
pub fn remove(path: &Path) -> Result<(), CgroupError> {
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove(&e.path())?;
            }
        }
    }
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CgroupError::Io {
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// The systemd unit (`foo.service`, `bar.scope`) or container id a cgroup
/// path names, if any: the innermost `.service`/`.scope` component, or a
/// 64-hex-digit container id (docker, containerd, podman).
pub fn unit_or_container(cgroup_path: &str) -> Option<String> {
    for comp in cgroup_path.rsplit('/') {
        let c = comp.trim_end_matches(".scope");
        for prefix in ["docker-", "cri-containerd-", "libpod-", "crio-"] {
            if let Some(id) = c.strip_prefix(prefix) {
                if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Some(format!("container:{}", &id[..12]));
                }
            }
        }
        if comp.len() == 64 && comp.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Some(format!("container:{}", &comp[..12]));
        }
        if comp.ends_with(".service") || comp.ends_with(".scope") {
            return Some(comp.to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        let info = "25 30 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                    26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:6 - cgroup2 cgroup2 rw,nsdelegate\n\
                    27 25 0:25 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n";
        assert_eq!(
            parse_cgroup2_mount(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_is_none() {
        let info = "25 30 0:23 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_cgroup2_mount(info), None);
    }

    #[test]
    fn units_and_containers_from_paths() {
        assert_eq!(
            unit_or_container("/system.slice/nginx.service").as_deref(),
            Some("nginx.service")
        );
        assert_eq!(
            unit_or_container("/user.slice/user-1000.slice/session-3.scope").as_deref(),
            Some("session-3.scope")
        );
        let id = "a".repeat(64);
        assert_eq!(
            unit_or_container(&format!("/system.slice/docker-{id}.scope")).as_deref(),
            Some("container:aaaaaaaaaaaa")
        );
        assert_eq!(unit_or_container("/guard-test/x"), None);
    }
}
