//! TLS termination with a local CA: everything the agent needs to speak TLS
//! on both sides of an intercepted connection.
//!
//! - [`ca`]: the local certificate authority, created once in the state
//!   directory and loaded on every later start.
//! - [`leaf`]: leaf certificates minted on demand for the name (SNI) or
//!   address a client connected to, cached in a bounded LRU, and the rustls
//!   server configuration that presents them.
//! - [`upstream`]: the rustls client configuration used to reach the real
//!   destination, and readable reasons for its failures.
//! - [`trust_store`]: installing the CA into the system trust store, and
//!   writing a CA bundle for child processes.
//!
//! Invariants:
//! - One crypto provider, `ring`, passed explicitly to every rustls builder
//!   (see [`crypto_provider`]); nothing here depends on a process-wide default.
//! - The CA private key never leaves the state directory: it is never logged,
//!   never exported, never printed by `Debug`.
//! - Upstream certificates are always verified. There is no switch to skip
//!   verification; a failure becomes a readable reason, never a silent pass.
//!
//! This module knows nothing about policy, HTTP or the event store: it is
//! called by `intercept` and `http`, and calls nobody else in the agent.

pub mod ca;
pub mod leaf;
pub mod trust_store;
pub mod upstream;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The crypto provider every TLS configuration in the agent is built with.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs [`crypto_provider`] as the process-wide default, for libraries
/// that build their own rustls configurations. Harmless if a default is
/// already installed (the first one stays).
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Fills `buf` with random bytes from the crypto provider.
pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<(), rustls::crypto::GetRandomFailed> {
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(buf)
}

/// A random positive serial number for a new certificate (RFC 5280: at most
/// 20 octets, positive).
pub(crate) fn random_serial() -> Result<rcgen::SerialNumber, rustls::crypto::GetRandomFailed> {
    let mut bytes = [0u8; 16];
    random_bytes(&mut bytes)?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // never a leading zero octet, never negative
    Ok(rcgen::SerialNumber::from_slice(&bytes))
}
