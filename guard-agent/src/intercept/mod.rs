//! Interception of redirected connections: accepting them, recovering their
//! original destination, recognising their protocol and forwarding them.
//!
//! [`sniff`] classifies the first bytes a client sends without consuming them.

pub mod sniff;
