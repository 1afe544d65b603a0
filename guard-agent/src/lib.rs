//! Guard's agent: the daemon that receives connections the kernel programs
//! redirected, finds out who made them, applies policy, forwards them and
//! records what happened; and the CLI that talks to it.
//!
//! One module per concern (see ARCHITECTURE.md for the map). Only `intercept`
//! and `http` sit on the hot path.

/// mimalloc instead of glibc's malloc: request bodies and their masked
/// copies are large, short-lived buffers; glibc maps and unmaps them (page
/// faults on every request), mimalloc keeps reusing the same pages.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod admin;
pub mod approval;
pub mod bpf;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dlp;
pub mod dns;
pub mod handover;
pub mod http;
pub mod install;
pub mod intercept;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod proc;
pub mod report;
pub mod scope;
pub mod secrets;
pub mod shutdown;
pub mod store;
pub mod tls;
