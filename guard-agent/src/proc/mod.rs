//! Attribution: who is behind a pid, from `/proc` — executable, command
//! line, up to five ancestors, user name, cgroup and the systemd unit or
//! container it belongs to.
//!
//! Lookups read the filesystem, so callers run them off the accept loop
//! ([`ProcCache::lookup`] uses `spawn_blocking`). Results are cached by
//! (pid, start time), so a recycled pid is never given a previous owner's
//! identity. A pid verified less than [`REVERIFY_AFTER`] ago is trusted
//! without reading `/proc` again: the kernel reuses a pid only after handing
//! out all the others (`pid_max`), which takes far longer. (An exec keeps
//! pid and start time: like the cache, the window does not notice it.) A
//! process that exited before we looked leaves only what the kernel
//! recorded (comm, uid); this module never guesses beyond that.

use std::{
    collections::HashMap,
    fs,
    num::NonZeroUsize,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lru::LruCache;
use serde::{Deserialize, Serialize};

/// How many ancestors are recorded.
pub const MAX_ANCESTORS: usize = 5;

/// One ancestor of a process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ancestor {
    pub pid: u32,
    pub exe: String,
}

/// What we know about a process.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcInfo {
    pub exe: Option<String>,
    /// The raw command line: callers mask it before recording it (see
    /// [`ProcInfo::masked_cmdline`]).
    pub cmdline: Option<String>,
    pub ancestors: Vec<Ancestor>,
    pub cgroup: Option<String>,
    pub unit: Option<String>,
    /// The command line after masking, computed once per process.
    #[serde(skip)]
    masked: std::sync::OnceLock<Option<String>>,
}

impl ProcInfo {
    /// The command line with `mask` applied (returning `None` when nothing
    /// needs masking), computed on first use and kept with the cache entry.
    pub fn masked_cmdline(&self, mask: impl FnOnce(&str) -> Option<String>) -> Option<&str> {
        self.masked
            .get_or_init(|| {
                self.cmdline
                    .as_deref()
                    .map(|c| mask(c).unwrap_or_else(|| c.to_owned()))
            })
            .as_deref()
    }
}

/// Start time of a process in clock ticks since boot (field 22 of `stat`),
/// and its parent pid (field 4).
fn stat_fields(pid: u32) -> Option<(u64, u32)> {
    // One read into a stack buffer: this runs for every connection.
    let mut buf = [0u8; 1024];
    let n = fs::File::open(format!("/proc/{pid}/stat"))
        .and_then(|mut f| std::io::Read::read(&mut f, &mut buf))
        .ok()?;
    let stat = std::str::from_utf8(&buf[..n]).ok()?;
    // comm is in parentheses and may contain spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, ppid))
}

fn exe_of(pid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/exe")).ok().map(|p| {
        p.to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_owned()
    })
}

fn cmdline_of(pid: u32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    let parts: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    Some(parts.join(" "))
}

/// Reads a process's identity from `/proc` now.
pub fn read_proc(pid: u32) -> ProcInfo {
    let cgroup = crate::cgroup::cgroup_of_pid(pid);
    let unit = cgroup.as_deref().and_then(crate::cgroup::unit_or_container);
    let mut ancestors = Vec::new();
    let mut cur = stat_fields(pid).map(|(_, ppid)| ppid);
    while let Some(ppid) = cur {
        if ppid == 0 || ancestors.len() >= MAX_ANCESTORS {
            break;
        }
        ancestors.push(Ancestor {
            pid: ppid,
            exe: exe_of(ppid).unwrap_or_else(|| "?".to_owned()),
        });
        cur = stat_fields(ppid).map(|(_, p)| p);
    }
    ProcInfo {
        exe: exe_of(pid),
        cmdline: cmdline_of(pid),
        ancestors,
        cgroup,
        unit,
        masked: Default::default(),
    }
}

/// How long a verified pid is trusted without reading `/proc/PID/stat`
/// again (when `pid_max` is at least [`MIN_PID_MAX_FOR_REUSE`]). Reusing a
/// pid within it would take `pid_max` forks in that time: over 300 000 per
/// second at the smallest `pid_max` this is allowed for.
pub const REVERIFY_AFTER: Duration = Duration::from_millis(100);
/// Below this `pid_max`, every lookup reads `/proc/PID/stat`.
const MIN_PID_MAX_FOR_REUSE: u64 = 32768;

/// A bounded cache of [`ProcInfo`] keyed by (pid, start time), and of user
/// names by uid.
pub struct ProcCache {
    procs: Mutex<LruCache<(u32, u64), Arc<ProcInfo>>>,
    /// Pids verified recently, with when (see [`REVERIFY_AFTER`]).
    recent: Mutex<LruCache<u32, (Instant, Arc<ProcInfo>)>>,
    /// Zero when `pid_max` is too small to trust a pid without a read.
    reverify_after: Duration,
    users: Mutex<HashMap<u32, Option<String>>>,
}

impl Default for ProcCache {
    fn default() -> Self {
        Self::new(4096)
    }
}

impl ProcCache {
    pub fn new(capacity: usize) -> Self {
        let pid_max = fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        Self::with_reverify(capacity, pid_max >= MIN_PID_MAX_FOR_REUSE)
    }

    fn with_reverify(capacity: usize, trust_recent: bool) -> Self {
        let cap = NonZeroUsize::new(capacity.max(1)).unwrap();
        Self {
            procs: Mutex::new(LruCache::new(cap)),
            recent: Mutex::new(LruCache::new(cap)),
            reverify_after: if trust_recent {
                REVERIFY_AFTER
            } else {
                Duration::ZERO
            },
            users: Mutex::new(HashMap::new()),
        }
    }

    /// Identity of `pid`: a pid verified within [`REVERIFY_AFTER`] costs
    /// nothing; another cache hit costs one small read of `/proc/PID/stat`
    /// on the calling task; a miss reads the rest on a blocking thread.
    pub async fn lookup(self: &Arc<Self>, pid: u32) -> Arc<ProcInfo> {
        let now = Instant::now();
        if let Some((at, info)) = self.recent.lock().unwrap().get(&pid) {
            if now.duration_since(*at) < self.reverify_after {
                return Arc::clone(info);
            }
        }
        let Some((start, _)) = stat_fields(pid) else {
            return Arc::new(ProcInfo::default());
        };
        let info = match self.cached(pid, start) {
            Some(hit) => hit,
            None => {
                let this = Arc::clone(self);
                match tokio::task::spawn_blocking(move || this.read_and_cache(pid, start)).await {
                    Ok(info) => info,
                    Err(_) => return Arc::new(ProcInfo::default()),
                }
            }
        };
        self.recent
            .lock()
            .unwrap()
            .put(pid, (now, Arc::clone(&info)));
        info
    }

    /// Same as [`ProcCache::lookup`], on the calling thread.
    pub fn lookup_blocking(&self, pid: u32) -> Arc<ProcInfo> {
        let Some((start, _)) = stat_fields(pid) else {
            return Arc::new(ProcInfo::default());
        };
        self.cached(pid, start)
            .unwrap_or_else(|| self.read_and_cache(pid, start))
    }

    fn cached(&self, pid: u32, start: u64) -> Option<Arc<ProcInfo>> {
        self.procs.lock().unwrap().get(&(pid, start)).cloned()
    }

    /// Reads `pid`'s identity from `/proc` (blocking) and caches it under
    /// the start time its caller read.
    fn read_and_cache(&self, pid: u32, start: u64) -> Arc<ProcInfo> {
        let info = Arc::new(read_proc(pid));
        self.procs
            .lock()
            .unwrap()
            .put((pid, start), Arc::clone(&info));
        info
    }

    /// The user name of a uid (cached; `None` when there is none).
    pub fn user_name(&self, uid: u32) -> Option<String> {
        if let Some(n) = self.users.lock().unwrap().get(&uid) {
            return n.clone();
        }
        let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        self.users.lock().unwrap().insert(uid, name.clone());
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let info = read_proc(std::process::id());
        assert!(info.exe.unwrap().contains("guard_agent"));
        assert!(info.cmdline.is_some());
        assert!(!info.ancestors.is_empty());
        assert!(info.cgroup.unwrap().starts_with('/'));
    }

    #[test]
    fn cache_returns_the_same_entry_for_the_same_process() {
        let cache = ProcCache::new(4);
        let a = cache.lookup_blocking(std::process::id());
        let b = cache.lookup_blocking(std::process::id());
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[tokio::test]
    async fn a_recently_verified_pid_is_trusted_until_the_window_ends() {
        let me = std::process::id();
        let start = stat_fields(me).unwrap().0;
        // Swapping what the (pid, start) entry says shows whether a lookup
        // read /proc/PID/stat (a verification) or trusted the window.
        let swap = |cache: &ProcCache| {
            let other = Arc::new(ProcInfo::default());
            cache
                .procs
                .lock()
                .unwrap()
                .put((me, start), Arc::clone(&other));
            other
        };
        let cache = Arc::new(ProcCache::with_reverify(4, true));
        let first = cache.lookup(me).await;
        let other = swap(&cache);
        assert!(Arc::ptr_eq(&cache.lookup(me).await, &first));
        // Once the window is over, the pid is verified again.
        cache.recent.lock().unwrap().peek_mut(&me).unwrap().0 -= REVERIFY_AFTER;
        assert!(Arc::ptr_eq(&cache.lookup(me).await, &other));
        // With a small pid_max there is no window: every lookup verifies.
        let strict = Arc::new(ProcCache::with_reverify(4, false));
        strict.lookup(me).await;
        let other = swap(&strict);
        assert!(Arc::ptr_eq(&strict.lookup(me).await, &other));
    }

    #[test]
    fn root_has_a_name() {
        assert_eq!(ProcCache::default().user_name(0).as_deref(), Some("root"));
    }
}
