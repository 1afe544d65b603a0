//! How the agent asks glibc's allocator to treat body-sized buffers.
//!
//! The HTTP pipeline buffers request bodies up to
//! [`crate::http::inspect::MAX_INSPECT_BYTES`] and the DLP engine writes a
//! masked copy of each body it changes: per request, a few buffers of up to
//! a few MiB that live for one inspection. glibc serves any allocation over
//! its mmap threshold with a fresh `mmap` and unmaps it on free, and trims
//! the heap when more than its trim threshold is free at the top; its
//! dynamic thresholds settle at about the size of the last large buffer,
//! which is too tight for "a body and its masked copy, per request". Every
//! body then costs a page fault per 4 KiB touched (in `cargo xtask bench`'s
//! DLP figures, a quarter of the CPU time on a 1 MiB JSON body with dense
//! findings).
//!
//! [`tune_for_body_buffers`] fixes both thresholds at sizes that cover the
//! inspection buffers, so they come from (and go back to) the heap. The
//! price is bounded: at most [`TRIM_THRESHOLD`] of free memory stays mapped
//! at the top of each arena after a burst of large bodies, which is what
//! glibc's own dynamic rule settles at after one 8 MiB body. Start-up
//! (loading the kernel programs, compiling the policy's regexes) frees
//! several MiB that the trim threshold would now keep: the daemon calls
//! [`return_free_memory`] once it is up, so idle RSS stays what it was
//! (`cargo xtask bench` reports it: 28 MiB, target < 50 MiB; 39 MiB without
//! the call).
//!
//! The same thresholds keep what a busy period freed: after 200 000
//! keep-alive HTTPS requests the agent's RSS stood at 105–140 MiB, half of
//! it free heap in the arenas of the threads that served them (a
//! `malloc_trim` brought it to 55 MiB). [`QuietTrim`] decides when to give
//! that back: once the agent goes quiet after recording events, never while
//! it is busy (a trim holds each arena's lock while it walks it).
//!
//! What it must never do: replace the allocator or change anything on other
//! C libraries (there it does nothing).

use std::time::Duration;

/// Allocations up to this size come from the heap, not their own mapping:
/// a whole inspected body and its masked copy.
pub const MMAP_THRESHOLD: usize = 8 << 20;

/// Free memory at the top of a heap is returned to the kernel only above
/// this size.
pub const TRIM_THRESHOLD: usize = 16 << 20;

// The build fails if the inspection buffer outgrows the threshold.
const _: () = assert!(MMAP_THRESHOLD >= crate::http::inspect::MAX_INSPECT_BYTES);
const _: () = assert!(TRIM_THRESHOLD >= MMAP_THRESHOLD);

/// Sets glibc's mmap and trim thresholds (see the module doc). Call once,
/// first thing in `main`, before threads start. Returns whether both were
/// set (always `false` off glibc).
pub fn tune_for_body_buffers() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt takes two integers and only changes allocator
        // parameters; both values fit in a c_int.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Returns the free memory of every arena to the kernel (`malloc_trim`),
/// whatever the trim threshold: for the end of start-up. Returns whether
/// anything was released (always `false` off glibc).
pub fn return_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only releases free memory; any pad is valid.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// How often the daemon asks [`QuietTrim`] whether to return free memory.
pub const QUIET_CHECK: Duration = Duration::from_secs(10);

/// A window with at most this many recorded events counts as quiet.
pub const QUIET_EVENTS: u64 = 20;

/// When to return free memory: at the end of a window of
/// [`QUIET_CHECK`] in which at most [`QUIET_EVENTS`] events were recorded,
/// if any were recorded since the last trim. So a burst is followed by one
/// trim once it is over, a slow trickle by one trim per window, and an idle
/// agent by none.
#[derive(Debug)]
pub struct QuietTrim {
    /// The activity count at the last check.
    seen: u64,
    /// The activity count at the last trim.
    trimmed: u64,
}

impl QuietTrim {
    /// Starts from the activity count now (start-up already trimmed).
    pub fn new(activity: u64) -> Self {
        Self {
            seen: activity,
            trimmed: activity,
        }
    }

    /// Called once per window with the activity count (events written so
    /// far, a counter that never goes down): whether to trim now.
    pub fn check(&mut self, activity: u64) -> bool {
        let in_window = activity.saturating_sub(self.seen);
        self.seen = activity;
        if in_window <= QUIET_EVENTS && activity != self.trimmed {
            self.trimmed = activity;
            return true;
        }
        false
    }
}

/// Returns free memory whenever [`QuietTrim`] says so, checking every
/// [`QUIET_CHECK`] on `activity` (events written so far), until `stop`
/// turns true. The trim runs on the blocking pool: it walks every arena.
pub async fn trim_when_quiet(
    activity: impl Fn() -> u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut quiet = QuietTrim::new(activity());
    let mut tick = tokio::time::interval(QUIET_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if !quiet.check(activity()) {
            continue;
        }
        let _ = tokio::task::spawn_blocking(|| {
            let kib = || resident().map(|r| r.now_kib);
            let before = kib();
            return_free_memory();
            tracing::debug!(
                before_kib = before,
                after_kib = kib(),
                "quiet: returned free memory"
            );
        })
        .await;
    }
}

/// The process's memory as the kernel counts it, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resident {
    /// Resident now (`VmRSS`).
    pub now_kib: u64,
    /// The highest it has been (`VmHWM`).
    pub peak_kib: u64,
}

/// Reads [`Resident`] from `/proc/self/status` (for the log, `status` and
/// the metrics).
pub fn resident() -> Option<Resident> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(Resident {
        now_kib: field("VmRSS")?,
        peak_kib: field("VmHWM")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_period_is_trimmed_once_when_it_ends() {
        let mut t = QuietTrim::new(0);
        // Idle from the start: nothing to give back.
        assert!(!t.check(0));
        // Busy: thousands of events per window, no trim while it lasts.
        assert!(!t.check(5_000));
        assert!(!t.check(12_000));
        // Over (a straggler or two): one trim, then none while idle.
        assert!(t.check(12_003));
        assert!(!t.check(12_003));
        assert!(!t.check(12_003));
    }

    #[test]
    fn a_trickle_is_trimmed_per_window_and_a_burst_is_not() {
        let mut t = QuietTrim::new(100);
        assert!(t.check(100 + QUIET_EVENTS));
        assert!(t.check(100 + 2 * QUIET_EVENTS));
        assert!(!t.check(100 + 3 * QUIET_EVENTS + 1));
        assert!(t.check(100 + 3 * QUIET_EVENTS + 1));
    }

    #[test]
    fn the_resident_set_is_read() {
        let r = resident().expect("/proc/self/status");
        assert!(r.now_kib > 0 && r.peak_kib >= r.now_kib, "{r:?}");
    }

    #[test]
    fn glibc_accepts_both_thresholds() {
        // glibc caps M_MMAP_THRESHOLD at 32 MiB on 64-bit (HEAP_MAX / 2):
        // a larger value would be refused, and this would fail.
        assert!(tune_for_body_buffers());
    }
}
