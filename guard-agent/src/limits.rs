//! The agent's open-file limit: raised at start, reported while it runs.
//!
//! Every redirected connection holds two sockets, and a spliced one two
//! pipes more (six descriptors). Services under systemd start with a soft
//! limit of 1024, which ~170 concurrent spliced connections exhaust: then
//! accepts fail and upstream connects are refused with `EMFILE`, and
//! monitored programs see resets. systemd's advice (systemd.exec(5),
//! `LimitNOFILE=`) is for a program that needs more to raise its soft
//! limit to the hard one itself, which [`raise_open_files`] does at start.
//!
//! Programs the agent starts (approval hooks) get the limit it started
//! with back ([`start_with_original_limit`]), as systemd.exec(5) asks:
//! some still use `select()`, which breaks on descriptors above 1024.
//!
//! This module must never lower the agent's own limit, and never fail the
//! start: an agent with few descriptors still serves, with a warning that
//! says so.

use std::io;

/// Below this soft limit the agent warns at start.
pub const FEW_OPEN_FILES: u64 = 8192;

/// The open-file limit before and after [`raise_open_files`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Raised {
    pub before: u64,
    pub now: u64,
}

fn get() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

/// The limit before the first raise, for child processes.
static ORIGINAL: std::sync::OnceLock<libc::rlimit> = std::sync::OnceLock::new();

/// Raises the soft open-file limit to the hard limit.
pub fn raise_open_files() -> io::Result<Raised> {
    let lim = get()?;
    ORIGINAL.get_or_init(|| lim);
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(Raised {
        before,
        now: get()?.rlim_cur,
    })
}

/// Raises the limit and logs the outcome (the daemon's start).
pub fn raise_open_files_and_report() {
    match raise_open_files() {
        Ok(r) if r.now < FEW_OPEN_FILES => tracing::warn!(
            limit = r.now,
            "few open files allowed: about {} concurrent connections; raise the hard limit (LimitNOFILE= in the unit, or ulimit -Hn)",
            r.now / 6
        ),
        Ok(r) if r.now != r.before => {
            tracing::info!(from = r.before, to = r.now, "open-file limit raised")
        }
        Ok(r) => tracing::debug!(limit = r.now, "open-file limit"),
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
}

/// Makes `cmd`'s process start with the open-file limit the agent was
/// started with, not the raised one.
pub fn start_with_original_limit(cmd: &mut tokio::process::Command) {
    if let Some(original) = ORIGINAL.get().copied() {
        start_with_limit(cmd, original);
    }
}

fn start_with_limit(cmd: &mut tokio::process::Command, limit: libc::rlimit) {
    // SAFETY: setrlimit is async-signal-safe; limit is plain data.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Descriptors the agent holds now, and how many it may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptors {
    pub open: u64,
    pub limit: u64,
}

/// What `status` and the metrics show; `None` when /proc cannot tell.
pub fn descriptors() -> Option<Descriptors> {
    // One entry per descriptor, less the one read_dir itself holds.
    let open = entries(std::path::Path::new("/proc/self/fd"))?;
    Some(Descriptors {
        open: open.saturating_sub(1),
        limit: get().ok()?.rlim_cur,
    })
}

fn entries(dir: &std::path::Path) -> Option<u64> {
    Some(std::fs::read_dir(dir).ok()?.count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit_and_never_lower() {
        let before = get().unwrap();
        let r = raise_open_files().unwrap();
        let after = get().unwrap();
        assert_eq!(r.before, before.rlim_cur);
        assert_eq!(r.now, after.rlim_cur);
        assert_eq!(after.rlim_cur, after.rlim_max);
        assert_eq!(after.rlim_max, before.rlim_max);
        assert!(after.rlim_cur >= before.rlim_cur);
        // Again: nothing left to raise.
        assert_eq!(raise_open_files().unwrap().before, after.rlim_cur);
    }

    #[tokio::test]
    async fn a_child_starts_with_the_limit_it_is_given_not_the_agents() {
        let hard = get().unwrap().rlim_max;
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", "ulimit -Sn"]);
        start_with_limit(
            &mut cmd,
            libc::rlimit {
                rlim_cur: 777,
                rlim_max: hard,
            },
        );
        let out = cmd.output().await.unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "777");
        // The agent's own limit did not move.
        assert_ne!(get().unwrap().rlim_cur, 777);
    }

    #[test]
    fn descriptors_are_counted_against_the_soft_limit() {
        // Other tests open files in parallel threads, so /proc/self/fd is
        // counted here on a directory of known size.
        let dir = tempfile::tempdir().unwrap();
        for name in ["a", "b", "c"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(entries(dir.path()), Some(3));
        assert_eq!(entries(&dir.path().join("missing")), None);
        let d = descriptors().unwrap();
        assert!(d.open >= 3, "stdin, stdout and stderr at least: {d:?}");
        assert_eq!(d.limit, get().unwrap().rlim_cur);
    }
}
