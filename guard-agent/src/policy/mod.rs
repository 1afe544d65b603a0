//! Policy: what the agent does with each connection and request.
//!
//! Policies are RON files in a directory (`policies/README.md` documents the
//! language). They are parsed and validated once, compiled into matchers,
//! and served from a [`PolicyStore`] that reloads atomically: a bad file
//! never replaces a good policy.
//!
//! Files, by concern:
//! - `schema.rs`: the language as serde types (what users write);
//! - `detectors.rs`: built-in detector names and groups, "did you mean";
//! - `compile.rs`: validation, combining files, building matchers;
//! - `decide.rs`: the hot path, `RequestFacts` in, `Decision` out;
//! - `explain.rs`: the same decision with a per-rule trace, for the CLI;
//! - `load.rs`: reading a directory, errors with file/line/column, reload.
//!
//! Invariants and limits:
//! - This module never sees or stores a secret: findings arrive as detector
//!   names plus a "goes home" flag computed by the caller. Its errors and
//!   traces can therefore be logged freely.
//! - It depends on no other agent module; callers adapt to it.
//! - Nothing on the hot path parses or compiles: `decide` only walks
//!   prebuilt glob sets, CIDRs and sorted name lists.
//! - It decides; it does not act. Masking, blocking, holding for approval
//!   and recording are the callers' (see [`APPROVAL_NOT_CONFIGURED`]).

mod compile;
mod decide;
mod detectors;
mod explain;
mod load;
pub mod schema;

pub use compile::CompiledPolicy;
pub use decide::{
    Condition, Decision, FindingFact, MaskScope, RequestFacts, Verdict, APPROVAL_NOT_CONFIGURED,
    DEFAULT_RULE,
};
pub use detectors::{is_builtin, BUILTIN_DETECTORS, DETECTOR_GROUPS};
pub use explain::{Explanation, RuleOutcome, RuleTrace};
pub use load::{load_dir, load_files, load_sources, parse_policy, PolicyError, PolicyStore};
pub use schema::{Action, MaskStyle, Mode, PolicyFile, Protocol};

#[cfg(test)]
mod tests;
