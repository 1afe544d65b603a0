//! The policy language as written: plain serde data, one `PolicyFile` per
//! `*.ron` file. Nothing here is validated beyond what serde checks (field and
//! variant names, types); `compile.rs` validates and turns it into matchers.
//!
//! Every struct denies unknown fields so that a typo is an error with a
//! position and a suggestion, never a silently ignored condition.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One `*.ron` file. The base file sets `mode` and `default`; fragment files
/// leave both out and only add rules and detector settings (see `load.rs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename = "Policy", deny_unknown_fields)]
pub struct PolicyFile {
    pub name: String,
    #[serde(default)]
    pub mode: Option<Mode>,
    #[serde(default)]
    pub default: Option<Action>,
    #[serde(default)]
    pub detectors: DetectorSettings,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// Enforce applies decisions; Monitor records what would have happened and
/// changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    Enforce,
    Monitor,
}

/// Detector configuration. It is passed through to the DLP engine; the policy
/// module only checks names, regexes and globs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorSettings {
    /// Detectors switched off (built-in or custom names). All others are on.
    #[serde(default)]
    pub disabled: Vec<String>,
    /// Mask style per detector; detectors not listed use `Redact`.
    #[serde(default)]
    pub mask: BTreeMap<String, MaskStyle>,
    /// Values that are never findings (known test keys, example domains).
    #[serde(default)]
    pub allowlist: Vec<AllowlistEntry>,
    /// Detectors defined by this policy.
    #[serde(default)]
    pub custom: Vec<CustomDetector>,
}

/// How a masked finding is rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum MaskStyle {
    /// `[REDACTED:credit-card]`
    #[default]
    Redact,
    /// Keep the last four characters.
    Last4,
    /// A stable token derived from the value (same value, same token).
    Token,
}

/// A value pattern that DLP must not report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowlistEntry {
    /// Detectors the entry applies to; empty means all.
    #[serde(default)]
    pub detectors: Vec<String>,
    /// Regex (Rust `regex` syntax) matched against the candidate value.
    pub regex: String,
}

/// A detector defined in policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomDetector {
    /// Kebab-case name, must not clash with a built-in.
    pub name: String,
    pub regex: String,
    /// Words that must appear near a match (empty: none needed).
    #[serde(default)]
    pub keywords: Vec<String>,
    #[serde(default)]
    pub validator: Option<Validator>,
    /// Which detector group the findings belong to (`@secret`, `@pii`).
    #[serde(default = "DetectorClass::secret")]
    pub class: DetectorClass,
    /// Host globs of the service this secret belongs to ("goes home").
    #[serde(default)]
    pub home: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Validator {
    Luhn,
    Mod97,
    /// Minimum Shannon entropy in bits per character.
    Entropy(f64),
}

/// Detector groups usable in rules as `@secret`, `@pii`; `@any` is any finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DetectorClass {
    Secret,
    Pii,
    Other,
}

impl DetectorClass {
    fn secret() -> Self {
        DetectorClass::Secret
    }
}

/// One ordered rule: if `when` matches and `unless` does not, `action`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub when: Match,
    #[serde(default)]
    pub unless: Option<Match>,
    pub action: Action,
}

/// Conditions of a rule. Every field set must hold (AND); within one field,
/// any listed value may match (OR). An empty `Match` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Executable path globs, e.g. `"/usr/bin/curl"`, `"**/node"`.
    #[serde(default)]
    pub exe: Vec<String>,
    /// Exact process names (`comm`, at most 15 bytes in the kernel).
    #[serde(default)]
    pub comm: Vec<String>,
    /// Globs on the executables of ancestors: "started by node".
    #[serde(default)]
    pub ancestor: Vec<String>,
    #[serde(default)]
    pub user: Vec<String>,
    /// Matches if the process's user is in any of these groups.
    #[serde(default)]
    pub group: Vec<String>,
    #[serde(default)]
    pub uid: Vec<u32>,
    /// cgroup v2 path globs, e.g. `"/system.slice/**"`.
    #[serde(default)]
    pub cgroup: Vec<String>,
    /// systemd unit globs, e.g. `"docker-*.scope"`.
    #[serde(default)]
    pub unit: Vec<String>,
    /// Destination host globs (SNI or Host header), case-insensitive.
    #[serde(default)]
    pub host: Vec<String>,
    /// Destination address ranges, e.g. `"10.0.0.0/8"`, `"::1/128"`.
    #[serde(default)]
    pub cidr: Vec<String>,
    /// Destination ports: `443` or `"8000-8999"`.
    #[serde(default)]
    pub port: Vec<PortRange>,
    #[serde(default)]
    pub protocol: Vec<Protocol>,
    /// HTTP methods, case-insensitive.
    #[serde(default)]
    pub method: Vec<String>,
    /// URL path globs (query excluded); `*` stays within a segment, `**` crosses.
    #[serde(default)]
    pub path: Vec<String>,
    /// Any of these detectors (or groups `@secret`, `@pii`, `@any`) found.
    #[serde(default)]
    pub findings: Vec<String>,
    /// Any of these detectors found in a request NOT going to its home service.
    #[serde(default)]
    pub leaving_home: Vec<String>,
}

/// What a connection or request is, as the agent saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// Plain-text HTTP/1.x.
    Http,
    /// HTTP inside TLS that the agent terminated.
    Https,
    /// Anything else on TCP.
    Tcp,
    /// TLS the agent did not terminate (spliced).
    Tls,
    /// A DNS query through the agent's resolver (`host` is the name asked).
    Dns,
    /// Other UDP: decided in the kernel by destination address and port
    /// only (see `udp.rs`); rules listing it may use `cidr` and `port`.
    Udp,
}

/// What to do with a matching request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Action {
    Allow,
    Block {
        #[serde(default)]
        reason: Option<String>,
    },
    /// Mask findings of `detectors` (empty: all findings). With
    /// `except_home`, findings going to their own service are left alone.
    Mask {
        #[serde(default)]
        detectors: Vec<String>,
        #[serde(default)]
        except_home: bool,
    },
    RequireApproval {
        #[serde(default = "default_approval_timeout", with = "humantime_serde")]
        timeout: Duration,
        #[serde(default)]
        reason: Option<String>,
    },
    /// Let it through unchanged and flag the event for audit.
    AuditOnly,
}

fn default_approval_timeout() -> Duration {
    Duration::from_secs(120)
}

/// An inclusive port range; a single port is `start == end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        self.start <= port && port <= self.end
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.start == self.end {
            s.serialize_u16(self.start)
        } else {
            s.collect_str(self)
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PortVisitor;

        impl Visitor<'_> for PortVisitor {
            type Value = PortRange;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port (443) or a port range (\"8000-8999\")")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortRange, E> {
                let port = u16::try_from(v)
                    .map_err(|_| E::custom(format!("port {v} is out of range (0-65535)")))?;
                Ok(PortRange {
                    start: port,
                    end: port,
                })
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortRange, E> {
                let v = u64::try_from(v)
                    .map_err(|_| E::custom(format!("port {v} is out of range (0-65535)")))?;
                self.visit_u64(v)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortRange, E> {
                let parse = |s: &str| {
                    s.trim().parse::<u16>().map_err(|_| {
                        E::custom(format!(
                            "bad port range `{v}`: expected a port (443) or \"start-end\""
                        ))
                    })
                };
                let (start, end) = match v.split_once('-') {
                    Some((a, b)) => (parse(a)?, parse(b)?),
                    None => {
                        let p = parse(v)?;
                        (p, p)
                    }
                };
                if start > end {
                    return Err(E::custom(format!(
                        "bad port range `{v}`: start is greater than end"
                    )));
                }
                Ok(PortRange { start, end })
            }
        }

        d.deserialize_any(PortVisitor)
    }
}
