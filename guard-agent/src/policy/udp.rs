//! Rules for other UDP: those whose `when` lists `protocol: [Udp]`.
//!
//! The kernel decides UDP (`cgroup/sendmsg4|6`, `connect4|6` on UDP
//! sockets) from the destination address and port alone, by the most
//! specific match in an LPM map (`bpf/udp.rs` fills it). So a UDP rule may
//! only use `cidr`, `port` and `protocol`, no `unless`, and only `Allow` or
//! `Block`; anything else is a compile error naming the file, line, rule
//! and condition, never a silently ignored condition.
//!
//! This module only checks and keeps the rules; it never touches a map.

use ipnet::IpNet;

use super::compile::{CompiledRule, Ctx};
use super::decide::Verdict;
use super::load::PolicyError;
use super::schema::{Match, PortRange, Protocol};

/// Kernel entries (address prefixes × ports, ranges expanded) one policy's
/// UDP rules may need at most; the kernel map holds as many.
pub const MAX_UDP_POLICY_ENTRIES: usize = 4096;

/// A UDP rule as the kernel applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpPolicyRule {
    pub name: String,
    /// Destination networks; empty: every address.
    pub nets: Vec<IpNet>,
    /// Destination ports; empty: every port.
    pub ports: Vec<PortRange>,
    /// `Allow` (an exception) or `Block` (refused with `EPERM`).
    pub allow: bool,
}

impl UdpPolicyRule {
    /// How many kernel entries this rule expands to.
    pub fn entry_count(&self) -> usize {
        let nets = if self.nets.is_empty() {
            2
        } else {
            self.nets.len()
        };
        let ports: usize = if self.ports.is_empty() {
            1
        } else {
            self.ports
                .iter()
                .map(|p| usize::from(p.end - p.start) + 1)
                .sum()
        };
        nets * ports
    }
}

/// The conditions the kernel cannot see for a UDP datagram that `m` sets.
fn unseen_conditions(m: &Match) -> Vec<&'static str> {
    let set = [
        ("exe", !m.exe.is_empty()),
        ("comm", !m.comm.is_empty()),
        ("ancestor", !m.ancestor.is_empty()),
        ("user", !m.user.is_empty()),
        ("group", !m.group.is_empty()),
        ("uid", !m.uid.is_empty()),
        ("cgroup", !m.cgroup.is_empty()),
        ("unit", !m.unit.is_empty()),
        ("host", !m.host.is_empty()),
        ("method", !m.method.is_empty()),
        ("path", !m.path.is_empty()),
        ("findings", !m.findings.is_empty()),
        ("leaving_home", !m.leaving_home.is_empty()),
    ];
    set.iter().filter(|(_, s)| *s).map(|(n, _)| *n).collect()
}

/// The kernel form of `rule` if its `when` lists `Udp`; an error if it uses
/// anything the kernel cannot apply to UDP.
pub(crate) fn udp_rule(
    ctx: &Ctx,
    rule: &CompiledRule,
) -> Result<Option<UdpPolicyRule>, PolicyError> {
    if !rule.when.protocol.contains(&Protocol::Udp) {
        return Ok(None);
    }
    let name = &rule.name;
    let unseen = unseen_conditions(&rule.source.when);
    if !unseen.is_empty() {
        return Err(ctx.err(
            None,
            format!(
                "rule `{name}` lists protocol Udp but also `{}`: UDP is decided in the kernel by destination address and port only; use `cidr` and `port`, or a separate rule without Udp",
                unseen.join("`, `")
            ),
        ));
    }
    if rule.source.unless.is_some() {
        return Err(ctx.err(
            None,
            format!(
                "rule `{name}` lists protocol Udp and has `unless`: UDP rules cannot have exceptions; write an Allow rule for the narrower destination instead"
            ),
        ));
    }
    let allow = match &rule.verdict {
        Verdict::Allow => true,
        Verdict::Block { .. } => false,
        other => {
            return Err(ctx.err(
                None,
                format!(
                    "rule `{name}` lists protocol Udp with action {}: UDP rules can only Allow or Block",
                    other.kind()
                ),
            ))
        }
    };
    let udp = UdpPolicyRule {
        name: name.to_string(),
        nets: rule.when.cidr.clone(),
        ports: rule.when.port.clone(),
        allow,
    };
    if udp.entry_count() > MAX_UDP_POLICY_ENTRIES {
        return Err(ctx.err(
            None,
            format!(
                "rule `{name}` expands to {} kernel UDP entries (addresses × ports), more than {MAX_UDP_POLICY_ENTRIES}; narrow its port ranges",
                udp.entry_count()
            ),
        ));
    }
    Ok(Some(udp))
}

impl super::CompiledPolicy {
    /// Rules listing `protocol: [Udp]`, in rule order (the first of two
    /// rules for the same destination wins). Empty in `Monitor` mode: a
    /// policy in Monitor changes nothing, and UDP refusals are not recorded.
    pub fn udp_rules(&self) -> &[UdpPolicyRule] {
        match self.mode {
            super::Mode::Enforce => &self.udp,
            super::Mode::Monitor => &[],
        }
    }
}
