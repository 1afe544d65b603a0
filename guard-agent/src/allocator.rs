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
//! What it must never do: replace the allocator or change anything on other
//! C libraries (there it does nothing).

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_accepts_both_thresholds() {
        // glibc caps M_MMAP_THRESHOLD at 32 MiB on 64-bit (HEAP_MAX / 2):
        // a larger value would be refused, and this would fail.
        assert!(tune_for_body_buffers());
    }
}
