//! Policy: what the agent does with each connection and request.
//!
//! Policies are RON files in a directory (`policies/README.md` documents the
//! language). They are parsed and validated once, compiled into matchers,
//! and served from a [`PolicyStore`] that reloads atomically: a bad file
//! never replaces a good policy.
//!
//! ```
//! use guard_agent::policy::{load_sources, FindingFact, RequestFacts, Verdict};
//!
//! let policy = load_sources(&[(
//!     "inline.ron",
//!     r#"Policy(name: "p", mode: Enforce, default: Allow, rules: [
//!         Rule(name: "mask-cards", when: (findings: ["credit-card"]), action: Mask()),
//!     ])"#,
//! )])?;
//! let facts = RequestFacts {
//!     dest_host: Some("shop.example".into()),
//!     findings: vec![FindingFact::new("credit-card", false)],
//!     ..Default::default()
//! };
//! let decision = policy.decide(&facts);
//! assert!(matches!(decision.action, Verdict::Mask(_)));
//! assert_eq!(decision.rule.as_ref(), "mask-cards");
//! println!("{}", policy.explain(&facts)); // the per-rule trace
//! # Ok::<(), guard_agent::policy::PolicyError>(())
//! ```
//!
//! Live use: `PolicyStore::open(dir)` at start, `store.current()` per
//! connection (a cheap `Arc` snapshot), `store.reload(dir)` on SIGHUP or an
//! admin request; a failed reload returns the error and changes nothing.
//!
//! Files, by concern:
//! - `schema.rs`: the language as serde types (what users write);
//! - `detectors.rs`: built-in detector names and groups, "did you mean";
//! - `compile.rs`: validation, combining files, building matchers;
//! - `decide.rs`: the hot path, `RequestFacts` in, `Decision` out;
//! - `explain.rs`: the same decision with a per-rule trace, for the CLI;
//! - `load.rs`: reading a directory, errors with file/line/column, reload;
//! - `udp.rs`: rules listing `protocol: [Udp]`, checked and kept for the kernel.
//!
//! Invariants and limits:
//! - This module never sees or stores a secret: findings arrive as detector
//!   names plus a "goes home" flag computed by the caller. Its errors and
//!   traces can therefore be logged freely.
//! - It depends on no other agent module; callers adapt to it.
//! - Nothing on the hot path parses or compiles: `decide` only walks
//!   prebuilt glob sets, CIDRs and sorted name lists.
//! - It decides; it does not act. Masking, blocking, holding for approval
//!   and recording are the callers' (`http::pipeline`, `approval`).

mod compile;
mod decide;
mod detectors;
mod explain;
mod load;
pub mod schema;
mod udp;
mod version;

pub use compile::CompiledPolicy;
pub use decide::{
    Condition, Decision, FindingFact, MaskScope, RequestFacts, Verdict, DEFAULT_RULE,
};
pub use detectors::{is_builtin, BUILTIN_DETECTORS, DETECTOR_GROUPS};
pub use explain::{Explanation, RuleOutcome, RuleTrace};
pub use load::{load_dir, load_files, load_sources, parse_policy, PolicyError, PolicyStore};
pub use schema::{Action, MaskStyle, Mode, PolicyFile, Protocol};
pub use udp::{UdpPolicyRule, MAX_UDP_POLICY_ENTRIES};
pub use version::{PolicyStamp, PolicyVersion};

#[cfg(test)]
mod tests;
