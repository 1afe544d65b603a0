//! The data path for redirected connections: accept what the kernel
//! redirected, find where it was going and who made it, recognise its
//! protocol, connect upstream and copy both ways.
//!
//! This is the hot path. It must never block the accept loop (attribution
//! and store writes happen in per-connection tasks and the writer task), and
//! never forward a connection whose original destination it does not know.
//! [`sniff`] classifies the first bytes a client sends without consuming them.
//! [`workers`] runs all of it on threads of its own, a connection staying on
//! the thread that accepted it.

pub mod connect;
pub mod listener;
pub mod sniff;
pub mod splice;
pub mod workers;
