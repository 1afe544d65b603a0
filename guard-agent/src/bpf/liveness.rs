//! The agent's heartbeat in the kernel (`LIVENESS`) and the fail mode it
//! drives: enforce (fail closed, the default) or fail open after a window.
//!
//! The heartbeat is `CLOCK_MONOTONIC` in nanoseconds, the clock
//! `bpf_ktime_get_ns()` reads, written about once a second. This module only
//! writes the heartbeat and reads it back for `status`; the decision to
//! redirect or not is the kernel programs'.

use std::{sync::Mutex, time::Duration};

use aya::maps::{Array, MapData};
use guard_common::AgentLiveness;

/// How often the agent writes its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// `CLOCK_MONOTONIC` now, in nanoseconds (what `bpf_ktime_get_ns` returns).
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Writer and reader of the `LIVENESS` map.
pub struct Heartbeat {
    map: Mutex<Array<MapData, AgentLiveness>>,
    fail_open_after: Option<Duration>,
}

impl Heartbeat {
    pub(crate) fn new(
        map: Array<MapData, AgentLiveness>,
        fail_open_after: Option<Duration>,
    ) -> Self {
        Self {
            map: Mutex::new(map),
            fail_open_after,
        }
    }

    /// Records that the agent is alive now.
    pub fn beat(&self) -> Result<(), aya::maps::MapError> {
        let value = AgentLiveness {
            heartbeat_ns: monotonic_ns(),
            fail_open_after_ns: self.fail_open_after.map_or(0, |d| {
                u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
            }),
        };
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.set(0, value, 0)
    }

    /// Age of the heartbeat the kernel sees.
    pub fn age(&self) -> Option<Duration> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let v = map.get(&0, 0).ok()?;
        Some(Duration::from_nanos(
            monotonic_ns().saturating_sub(v.heartbeat_ns),
        ))
    }

    /// The fail-open window; None = enforce (fail closed).
    pub fn fail_open_after(&self) -> Option<Duration> {
        self.fail_open_after
    }

    /// "fail-closed" or "fail-open after 5s".
    pub fn fail_mode(&self) -> String {
        match self.fail_open_after {
            None => "fail-closed".to_owned(),
            Some(d) => format!("fail-open after {}", humantime::format_duration(d)),
        }
    }
}
