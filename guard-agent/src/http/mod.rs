//! The HTTP pipeline on hyper 1.x: every request on an intercepted
//! connection (TLS terminated, or plaintext HTTP/1 or h2c on any port) goes
//! through read → inspect → decide → act → forward → record.
//!
//! It must never forward a request before the policy decided, never forward
//! a blocked one, and never hand the store anything masking would remove.

pub mod body;
pub mod headers;
pub mod inspect;
pub mod pipeline;
pub mod tunnel;
pub mod upgrade;
pub mod upstream;
