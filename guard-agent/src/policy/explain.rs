//! `guard-agent policy explain`: the decision for a set of facts, and for
//! every rule in order whether it matched and, if not, which condition
//! failed and why. Slow by design (it formats strings); never called on the
//! hot path, and it reaches the same decision as `CompiledPolicy::decide`.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use super::compile::CompiledPolicy;
use super::decide::{normalize_host, strip_query, Condition, Decision, RequestFacts, RuleCheck};
use super::schema::Match;

/// The decision and how it was reached.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub decision: Decision,
    /// Version of the policy that decided (see `CompiledPolicy::version`).
    pub policy_version: u64,
    /// One entry per rule, in order.
    pub trace: Vec<RuleTrace>,
}

#[derive(Debug, Clone)]
pub struct RuleTrace {
    pub rule: Arc<str>,
    /// The file the rule is defined in.
    pub file: PathBuf,
    pub outcome: RuleOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleOutcome {
    /// This rule decided.
    Matched,
    /// A `when` condition failed; `detail` says what was compared.
    NotMatched {
        condition: Condition,
        detail: String,
    },
    /// `when` matched but `unless` matched too.
    Excepted,
    /// An earlier rule matched first.
    NotReached,
}

impl CompiledPolicy {
    /// Decide as [`CompiledPolicy::decide`] does, and say why.
    pub fn explain(&self, facts: &RequestFacts) -> Explanation {
        let mut trace = Vec::with_capacity(self.rules.len());
        let mut winner = None;
        for rule in &self.rules {
            let outcome = if winner.is_some() {
                RuleOutcome::NotReached
            } else {
                match rule.check(facts) {
                    RuleCheck::Matched => {
                        winner = Some(rule);
                        RuleOutcome::Matched
                    }
                    RuleCheck::Excepted => RuleOutcome::Excepted,
                    RuleCheck::Failed(condition) => RuleOutcome::NotMatched {
                        condition,
                        detail: mismatch_detail(condition, &rule.source.when, facts),
                    },
                }
            };
            trace.push(RuleTrace {
                rule: rule.name.clone(),
                file: self.files[rule.file].clone(),
                outcome,
            });
        }
        Explanation {
            decision: self.decision_for(winner),
            policy_version: self.version,
            trace,
        }
    }
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(|i| format!("`{i}`")).collect();
    format!("[{}]", items.join(", "))
}

fn fact<T: fmt::Display>(name: &str, value: Option<T>) -> String {
    match value {
        Some(v) => format!("{name} `{v}`"),
        None => format!("{name} unknown"),
    }
}

fn mismatch_detail(condition: Condition, m: &Match, f: &RequestFacts) -> String {
    let names = |v: &[String]| -> String {
        if v.is_empty() {
            "none".to_owned()
        } else {
            list(v)
        }
    };
    let (have, want) = match condition {
        Condition::Exe => (fact("exe", f.exe.as_deref()), list(&m.exe)),
        Condition::Comm => (fact("comm", f.comm.as_deref()), list(&m.comm)),
        Condition::Ancestor => (
            format!("ancestors {}", names(&f.ancestors)),
            list(&m.ancestor),
        ),
        Condition::User => (fact("user", f.user.as_deref()), list(&m.user)),
        Condition::Group => (format!("groups {}", names(&f.groups)), list(&m.group)),
        Condition::Uid => (fact("uid", f.uid), list(&m.uid)),
        Condition::Cgroup => (fact("cgroup", f.cgroup.as_deref()), list(&m.cgroup)),
        Condition::Unit => (fact("unit", f.systemd_unit.as_deref()), list(&m.unit)),
        Condition::Host => (
            fact("host", f.dest_host.as_deref().map(normalize_host)),
            list(&m.host),
        ),
        Condition::Cidr => (fact("ip", f.dest_ip), list(&m.cidr)),
        Condition::Port => (fact("port", f.dest_port), list(&m.port)),
        Condition::Protocol => (
            fact("protocol", f.protocol.map(|p| format!("{p:?}"))),
            format!("{:?}", m.protocol),
        ),
        Condition::Method => (fact("method", f.method.as_deref()), list(&m.method)),
        Condition::Path => (
            fact("path", f.path.as_deref().map(strip_query)),
            list(&m.path),
        ),
        Condition::Findings => {
            let found: Vec<String> = f.findings.iter().map(|x| x.detector.clone()).collect();
            (format!("findings {}", names(&found)), list(&m.findings))
        }
        Condition::LeavingHome => {
            let leaving: Vec<String> = f
                .findings
                .iter()
                .filter(|x| !x.goes_home)
                .map(|x| x.detector.clone())
                .collect();
            (
                format!("findings not going home {}", names(&leaving)),
                list(&m.leaving_home),
            )
        }
    };
    format!("{have} does not match {} {want}", condition.as_str())
}

impl fmt::Display for RuleOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleOutcome::Matched => f.write_str("MATCHED"),
            RuleOutcome::NotMatched { detail, .. } => write!(f, "no: {detail}"),
            RuleOutcome::Excepted => f.write_str("no: `when` matched but `unless` matched too"),
            RuleOutcome::NotReached => f.write_str("not reached (an earlier rule matched)"),
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "decision: {}", self.decision)?;
        let width = self.trace.iter().map(|t| t.rule.len()).max().unwrap_or(0);
        for (i, t) in self.trace.iter().enumerate() {
            writeln!(f, "  {:>2}. {:<width$}  {}", i + 1, t.rule, t.outcome)?;
        }
        if !self.trace.iter().any(|t| t.outcome == RuleOutcome::Matched) {
            writeln!(f, "  no rule matched: default applies")?;
        }
        Ok(())
    }
}
