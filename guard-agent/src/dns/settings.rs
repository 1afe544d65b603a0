//! DNS and UDP configuration: the `dns: (...)`, `udp_block` and `udp_allow`
//! fields of the agent's configuration file and their flags, validated into
//! [`DnsSettings`] and [`UdpRules`].
//!
//! Nothing here reads the network; `/etc/resolv.conf` is read only when no
//! upstream is configured (see [`super::upstream::system_resolvers`]).

use std::{net::SocketAddr, time::Duration};

use ipnet::IpNet;
use serde::Deserialize;

use crate::policy::schema::PortRange;

/// The `dns: (...)` section as written (all fields optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsFile {
    /// Turn the resolver (and the DNS redirect) off.
    pub enabled: Option<bool>,
    /// Where the resolver listens (UDP, loopback); default: the address and
    /// port of each TCP listener.
    pub listen: Option<Vec<String>>,
    /// Resolvers to forward to, `ip` or `ip:port`; default: the
    /// `nameserver` lines of `/etc/resolv.conf`.
    pub upstream: Option<Vec<String>>,
    /// What a name blocked by policy gets: `"nxdomain"` (default) or `"refused"`.
    pub block_answer: Option<String>,
    /// Tunnelling heuristics.
    pub tunnel: Option<TunnelFile>,
}

/// Tunnelling thresholds as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelFile {
    pub max_label_len: Option<usize>,
    pub min_label_entropy: Option<f64>,
    pub max_queries_per_minute: Option<u32>,
    pub max_txt_per_minute: Option<u32>,
}

/// A UDP destination rule as written: `(cidr: "10.0.0.0/8", port: 443)`;
/// a missing `cidr` means every address, a missing `port` every port.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpRuleFile {
    pub cidr: Option<String>,
    pub port: Option<PortRange>,
}

/// What the DNS flags of `guard-agent run` set.
#[derive(Debug, Default, Clone)]
pub struct DnsFlags {
    pub upstream: Vec<String>,
    pub listen: Vec<String>,
    pub no_dns: bool,
}

/// What a blocked name is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockAnswer {
    NxDomain,
    Refused,
}

/// Thresholds above which a query is flagged as likely tunnelling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TunnelLimits {
    /// A label at least this long and at least `min_label_entropy` bits per
    /// character is flagged.
    pub max_label_len: usize,
    pub min_label_entropy: f64,
    /// Queries per minute to one registered domain (last two labels).
    pub max_queries_per_minute: u32,
    /// TXT queries per minute to one registered domain.
    pub max_txt_per_minute: u32,
}

impl Default for TunnelLimits {
    fn default() -> Self {
        Self {
            max_label_len: 40,
            min_label_entropy: 3.5,
            max_queries_per_minute: 300,
            max_txt_per_minute: 30,
        }
    }
}

/// The validated DNS settings.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    pub enabled: bool,
    /// Explicit resolver addresses; empty: those of the TCP listeners.
    pub listen: Vec<SocketAddr>,
    /// Explicit upstreams; empty: `/etc/resolv.conf` at start.
    pub upstream: Vec<SocketAddr>,
    pub block_answer: BlockAnswer,
    pub tunnel: TunnelLimits,
    /// How long to wait for one upstream before trying the next.
    pub upstream_timeout: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: Vec::new(),
            upstream: Vec::new(),
            block_answer: BlockAnswer::NxDomain,
            tunnel: TunnelLimits::default(),
            upstream_timeout: Duration::from_secs(3),
        }
    }
}

/// One UDP destination rule, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpRule {
    pub net: Option<IpNet>,
    pub port: Option<PortRange>,
}

/// UDP destinations refused in the kernel, with exceptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpRules {
    pub block: Vec<UdpRule>,
    pub allow: Vec<UdpRule>,
}

impl Default for UdpRules {
    /// QUIC (UDP 443) is refused everywhere, so that clients fall back to
    /// TCP, where they are inspected.
    fn default() -> Self {
        Self {
            block: vec![UdpRule {
                net: None,
                port: Some(PortRange {
                    start: 443,
                    end: 443,
                }),
            }],
            allow: Vec::new(),
        }
    }
}

/// A field error: (field path, message).
pub type FieldError = (String, String);

/// Parses `ip` or `ip:port` (`[v6]:port`); the port defaults to `default_port`.
pub fn parse_addr(v: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(a) = v.parse::<SocketAddr>() {
        return Ok(a);
    }
    match v.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(SocketAddr::new(ip, default_port)),
        Err(_) => Err(format!(
            "`{v}` is not an address (expected e.g. 127.0.0.53, 10.0.0.2:53 or [::1]:53)"
        )),
    }
}

impl DnsSettings {
    /// Merges the file section and the flags (which win).
    pub fn build(file: Option<DnsFile>, flags: &DnsFlags) -> Result<Self, FieldError> {
        let file = file.unwrap_or_default();
        let mut s = DnsSettings {
            enabled: !flags.no_dns && file.enabled.unwrap_or(true),
            ..Default::default()
        };
        let upstream = if flags.upstream.is_empty() {
            file.upstream.unwrap_or_default()
        } else {
            flags.upstream.clone()
        };
        for (i, u) in upstream.iter().enumerate() {
            s.upstream
                .push(parse_addr(u, 53).map_err(|m| (format!("dns.upstream[{i}]"), m))?);
        }
        let listen = if flags.listen.is_empty() {
            file.listen.unwrap_or_default()
        } else {
            flags.listen.clone()
        };
        for (i, l) in listen.iter().enumerate() {
            let field = format!("dns.listen[{i}]");
            let a: SocketAddr = l.parse().map_err(|_| {
                (
                    field.clone(),
                    format!("`{l}` is not an address with a port (e.g. 127.0.0.1:15053)"),
                )
            })?;
            if !a.ip().is_loopback() || a.port() == 0 {
                return Err((
                    field,
                    format!("`{l}`: the resolver listens on loopback, on a non-zero port"),
                ));
            }
            if s.listen.iter().any(|x| x.is_ipv4() == a.is_ipv4()) {
                return Err((field, "at most one IPv4 and one IPv6 address".into()));
            }
            s.listen.push(a);
        }
        if let Some(b) = file.block_answer {
            s.block_answer = match b.to_ascii_lowercase().as_str() {
                "nxdomain" => BlockAnswer::NxDomain,
                "refused" => BlockAnswer::Refused,
                _ => {
                    return Err((
                        "dns.block_answer".into(),
                        format!("`{b}`: expected \"nxdomain\" or \"refused\""),
                    ))
                }
            };
        }
        if let Some(t) = file.tunnel {
            let d = TunnelLimits::default();
            s.tunnel = TunnelLimits {
                max_label_len: t.max_label_len.unwrap_or(d.max_label_len),
                min_label_entropy: t.min_label_entropy.unwrap_or(d.min_label_entropy),
                max_queries_per_minute: t
                    .max_queries_per_minute
                    .unwrap_or(d.max_queries_per_minute),
                max_txt_per_minute: t.max_txt_per_minute.unwrap_or(d.max_txt_per_minute),
            };
            if s.tunnel.max_label_len == 0 || s.tunnel.max_label_len > 63 {
                return Err((
                    "dns.tunnel.max_label_len".into(),
                    "must be between 1 and 63 (the longest DNS label)".into(),
                ));
            }
        }
        Ok(s)
    }
}

fn rules(field: &str, rules: Vec<UdpRuleFile>) -> Result<Vec<UdpRule>, FieldError> {
    rules
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let net = match r.cidr {
                Some(c) => Some(
                    crate::config::parse_net(&c).map_err(|m| (format!("{field}[{i}].cidr"), m))?,
                ),
                None => None,
            };
            if net.is_none() && r.port.is_none() {
                return Err((
                    format!("{field}[{i}]"),
                    "give a cidr, a port, or both".into(),
                ));
            }
            Ok(UdpRule { net, port: r.port })
        })
        .collect()
}

impl UdpRules {
    /// `udp_block` (default: port 443 everywhere) and `udp_allow`.
    pub fn build(
        block: Option<Vec<UdpRuleFile>>,
        allow: Option<Vec<UdpRuleFile>>,
    ) -> Result<Self, FieldError> {
        let mut r = UdpRules::default();
        if let Some(b) = block {
            r.block = rules("udp_block", b)?;
        }
        r.allow = rules("udp_allow", allow.unwrap_or_default())?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_ports_default_to_53() {
        let s = DnsSettings::build(
            Some(DnsFile {
                upstream: Some(vec!["127.0.0.3".into(), "[::1]:5353".into()]),
                ..Default::default()
            }),
            &DnsFlags::default(),
        )
        .unwrap();
        assert_eq!(s.upstream[0].to_string(), "127.0.0.3:53");
        assert_eq!(s.upstream[1].to_string(), "[::1]:5353");
    }

    #[test]
    fn a_bad_upstream_names_the_field() {
        let e = DnsSettings::build(
            None,
            &DnsFlags {
                upstream: vec!["resolver.local".into()],
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(e.0, "dns.upstream[0]");
        assert!(e.1.contains("resolver.local"), "{}", e.1);
    }

    fn config(text: &str) -> Result<crate::config::AgentConfig, crate::config::ConfigError> {
        let p = std::path::Path::new("/etc/guard/agent.ron");
        let f = crate::config::ConfigFile::parse(p, text)?;
        crate::config::AgentConfig::build(Some((p, f)), Default::default())
    }

    #[test]
    fn the_config_file_sets_dns_and_udp() {
        let c = config(
            r#"(cgroups: ["/sys/fs/cgroup/x"],
                dns: (upstream: ["10.0.0.2"], listen: ["127.0.0.1:5300"], block_answer: "refused",
                      tunnel: (max_label_len: 30)),
                udp_block: [(cidr: "10.0.0.0/8"), (port: "5000-5010")],
                udp_allow: [(cidr: "10.1.0.0/16", port: 53)])"#,
        )
        .unwrap();
        assert_eq!(c.dns.upstream[0].to_string(), "10.0.0.2:53");
        assert_eq!(c.dns.listen[0].port(), 5300);
        assert_eq!(c.dns.block_answer, BlockAnswer::Refused);
        assert_eq!(c.dns.tunnel.max_label_len, 30);
        assert_eq!(c.udp.block.len(), 2);
        assert_eq!(c.udp.allow[0].port.unwrap().start, 53);
    }

    #[test]
    fn dns_and_udp_errors_name_the_file_and_field() {
        let e = config(r#"(cgroups: ["/a"], dns: (block_answer: "drop"))"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/guard/agent.ron") && e.contains("dns.block_answer"),
            "{e}"
        );
        let e = config(r#"(cgroups: ["/a"], udp_block: [(cidr: "10.0.0/8")])"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("udp_block[0].cidr") && e.contains("10.0.0/8"),
            "{e}"
        );
        let e = config(r#"(cgroups: ["/a"], dns: (listen: ["0.0.0.0:53"]))"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("dns.listen[0]") && e.contains("loopback"), "{e}");
        let e = config("(\n  cgroups: [\"/a\"],\n  dns: (upstreams: []),\n)")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("upstreams"), "{e}");
    }

    #[test]
    fn quic_is_blocked_by_default() {
        let r = UdpRules::build(None, None).unwrap();
        assert_eq!(r.block.len(), 1);
        assert_eq!(r.block[0].port.unwrap().start, 443);
        assert!(r.block[0].net.is_none());
    }
}
