//! The L4 data path: accept what the kernel redirected, find where it was
//! going and who made it, connect upstream and copy both ways.
//!
//! This is the hot path. It must never block the accept loop (attribution
//! and store writes happen in per-connection tasks and the writer task), and
//! never forward a connection whose original destination it does not know.

pub mod listener;
pub mod splice;
