//! Guard's agent: the daemon that receives connections the kernel programs
//! redirected, finds out who made them, applies policy, forwards them and
//! records what happened; and the CLI that talks to it.
//!
//! One module per concern (see ARCHITECTURE.md for the map). Only `intercept`
//! and `http` sit on the hot path.

pub mod dlp;
