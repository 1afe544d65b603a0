//! Guard's agent: the daemon that receives connections the kernel programs
//! redirected, finds out who made them, applies policy, forwards them and
//! records what happened; and the CLI that talks to it.
//!
//! One module per concern (see `docs/ARCHITECTURE.md` for the map). Only
//! `intercept` and `http` sit on the hot path.

pub mod admin;
pub mod allocator;
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
pub mod limits;
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
