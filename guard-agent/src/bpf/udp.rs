//! The UDP side of the kernel programs (`guard-ebpf/src/udp.rs`): where the
//! resolver listens (`DNS_CONFIG`), which UDP destinations are refused
//! (`UDP_RULES`), and "who sent this DNS query" (`DNS_BY_PEER`).
//!
//! `UDP_RULES` holds the configuration's `udp_block`/`udp_allow` (QUIC
//! refused by default) plus the policy's `protocol: [Udp]` rules; for the
//! same destination key the policy wins. A reload updates the map entry by
//! entry, changed and new entries first and stale ones last, so an entry
//! both policies share (the QUIC block) is never missing.
//!
//! This module must never write a UDP rule that was not in the validated
//! configuration or policy, nor point the DNS redirect anywhere but loopback.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
};

use aya::maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData};
use guard_common::{
    udp_rule_key, DnsConfig, OriginalDst, SockAddrKey, UDP_ALLOW, UDP_BLOCK, UDP_RULE_KEY_LEN,
};
use ipnet::IpNet;

use super::{map_err, peer_key, BpfError, KernelPrograms};
use crate::dns::settings::{UdpRule, UdpRules};
use crate::policy::{schema::PortRange, UdpPolicyRule};

/// `UDP_RULES` contents: (prefix length, key data) → verdict.
pub type UdpEntries = BTreeMap<(u32, [u8; UDP_RULE_KEY_LEN]), u8>;
type UdpRulesMap = LpmTrie<MapData, [u8; UDP_RULE_KEY_LEN], u8>;

/// Entries `UDP_RULES` holds at most (port ranges are expanded).
pub const MAX_UDP_RULES: usize = 4096;

/// Reads (and consumes) who sent each DNS query the resolver receives.
pub struct DnsPeerTable {
    map: Mutex<HashMap<MapData, SockAddrKey, OriginalDst>>,
}

impl DnsPeerTable {
    /// Looks up and removes the entry for a query's source address.
    pub fn take(&self, peer: SocketAddr) -> Option<OriginalDst> {
        let key = peer_key(peer);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let v = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(v)
    }
}

/// The kernel's view of where the resolver listens.
pub fn dns_config(resolvers: &[SocketAddr]) -> DnsConfig {
    let mut dc = DnsConfig::default();
    for r in resolvers {
        match r {
            SocketAddr::V4(a) => {
                dc.resolver_v4 = a.ip().octets();
                dc.resolver_v4_port = a.port();
            }
            SocketAddr::V6(a) => {
                dc.resolver_v6 = a.ip().octets();
                dc.resolver_v6_port = a.port();
            }
        }
    }
    dc
}

/// The (address prefix, 16-byte address) of a rule's network; none = all
/// addresses of both families.
fn nets(rule: &UdpRule) -> Vec<(u32, [u8; 16])> {
    let all: [IpNet; 2] = ["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
    let list: Vec<IpNet> = match rule.net {
        Some(n) => vec![n],
        None => all.to_vec(),
    };
    list.iter()
        .map(|n| match n {
            IpNet::V4(n) => (
                96 + u32::from(n.prefix_len()),
                n.network().to_ipv6_mapped().octets(),
            ),
            IpNet::V6(n) => (u32::from(n.prefix_len()), n.network().octets()),
        })
        .collect()
}

/// `UDP_RULES` entries (prefix length over the 18-byte key, key data,
/// verdict): blocks first, then exceptions, so an allow with the same key
/// wins. Port ranges are expanded; `Err` if there would be too many.
pub fn udp_rule_entries(
    rules: &UdpRules,
) -> Result<Vec<(u32, [u8; UDP_RULE_KEY_LEN], u8)>, String> {
    let mut out = Vec::new();
    let lists = [(&rules.block, UDP_BLOCK), (&rules.allow, UDP_ALLOW)];
    for (list, verdict) in lists {
        for rule in list.iter() {
            let ports: Vec<u16> = match rule.port {
                Some(r) => (r.start..=r.end).collect(),
                None => vec![0],
            };
            for (prefix, addr) in nets(rule) {
                for &port in &ports {
                    out.push((16 + prefix, udp_rule_key(port, addr), verdict));
                    if out.len() > MAX_UDP_RULES {
                        return Err(format!(
                            "UDP rules expand to more than {MAX_UDP_RULES} kernel entries (narrow the port ranges)"
                        ));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// What `UDP_RULES` must hold: the configuration's entries, then the
/// policy's UDP rules on top (same key: the policy wins; two policy rules
/// with the same key: the first in rule order wins).
pub fn merged_udp_entries(
    config: &UdpRules,
    policy: &[UdpPolicyRule],
) -> Result<UdpEntries, String> {
    let mut out: UdpEntries = udp_rule_entries(config)?
        .into_iter()
        .map(|(prefix, key, verdict)| ((prefix, key), verdict))
        .collect();
    for rule in policy.iter().rev() {
        let verdict = if rule.allow { UDP_ALLOW } else { UDP_BLOCK };
        let nets: Vec<Option<IpNet>> = if rule.nets.is_empty() {
            vec![None]
        } else {
            rule.nets.iter().copied().map(Some).collect()
        };
        let ports: Vec<Option<PortRange>> = if rule.ports.is_empty() {
            vec![None]
        } else {
            rule.ports.iter().copied().map(Some).collect()
        };
        for &net in &nets {
            for &port in &ports {
                let one = UdpRules {
                    block: vec![UdpRule { net, port }],
                    allow: Vec::new(),
                };
                for (prefix, key, _) in udp_rule_entries(&one)? {
                    out.insert((prefix, key), verdict);
                }
            }
        }
        if out.len() > MAX_UDP_RULES {
            return Err(format!(
                "the configuration's and the policy's UDP rules need more than {MAX_UDP_RULES} kernel entries (narrow the port ranges)"
            ));
        }
    }
    Ok(out)
}

/// The live `UDP_RULES` map and what was last written to it; the daemon
/// applies each (re)loaded policy through it.
pub struct UdpRuleTable {
    inner: Mutex<(UdpRulesMap, UdpEntries)>,
}

impl UdpRuleTable {
    /// Makes the map hold `config` plus `policy`'s UDP rules. New and changed
    /// entries are written before stale ones are removed, so a destination
    /// refused before and after is refused throughout. On `Err` nothing was
    /// changed (too many entries) or the map was restored as far as the
    /// kernel allowed (a write failed).
    pub fn apply(&self, config: &UdpRules, policy: &[UdpPolicyRule]) -> Result<usize, BpfError> {
        let want = merged_udp_entries(config, policy).map_err(|message| BpfError::Map {
            map: "UDP_RULES",
            message,
        })?;
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (trie, have) = &mut *guard;
        if let Err(e) = write_entries(trie, have, &want) {
            let restore = have.clone();
            let _ = write_entries(trie, &want, &restore);
            return Err(e);
        }
        *have = want;
        Ok(have.len())
    }
}

/// Turns a map holding `have` into one holding `want`: upserts, then removals.
fn write_entries(
    trie: &mut UdpRulesMap,
    have: &UdpEntries,
    want: &UdpEntries,
) -> Result<(), BpfError> {
    for (&(prefix, data), &verdict) in want {
        if have.get(&(prefix, data)) != Some(&verdict) {
            trie.insert(&Key::new(prefix, data), verdict, 0)
                .map_err(map_err("UDP_RULES"))?;
        }
    }
    for &(prefix, data) in have.keys() {
        if !want.contains_key(&(prefix, data)) {
            trie.remove(&Key::new(prefix, data))
                .map_err(map_err("UDP_RULES"))?;
        }
    }
    Ok(())
}

impl KernelPrograms {
    /// The `UDP_RULES` map (once), holding the configuration's entries as
    /// `fill_udp_maps` wrote them; apply the policy's rules through it.
    pub fn udp_rules(&mut self, config: &UdpRules) -> Result<UdpRuleTable, BpfError> {
        let map = self.ebpf.take_map("UDP_RULES").ok_or(BpfError::Map {
            map: "UDP_RULES",
            message: "missing from the object, or already taken".into(),
        })?;
        let trie = LpmTrie::try_from(map).map_err(map_err("UDP_RULES"))?;
        let have = merged_udp_entries(config, &[]).map_err(|message| BpfError::Map {
            map: "UDP_RULES",
            message,
        })?;
        Ok(UdpRuleTable {
            inner: Mutex::new((trie, have)),
        })
    }

    /// Fills `DNS_CONFIG` and `UDP_RULES`; called before the programs load.
    pub(super) fn fill_udp_maps(
        ebpf: &mut aya::Ebpf,
        resolvers: &[SocketAddr],
        rules: &UdpRules,
    ) -> Result<(), BpfError> {
        let missing = |map| BpfError::Map {
            map,
            message: "missing from the object".into(),
        };
        if resolvers.iter().any(|r| !r.ip().is_loopback()) {
            return Err(BpfError::Map {
                map: "DNS_CONFIG",
                message: "the resolver must listen on loopback".into(),
            });
        }
        let mut config: Array<_, DnsConfig> = Array::try_from(
            ebpf.map_mut("DNS_CONFIG")
                .ok_or_else(|| missing("DNS_CONFIG"))?,
        )
        .map_err(map_err("DNS_CONFIG"))?;
        config
            .set(0, dns_config(resolvers), 0)
            .map_err(map_err("DNS_CONFIG"))?;

        let entries = udp_rule_entries(rules).map_err(|message| BpfError::Map {
            map: "UDP_RULES",
            message,
        })?;
        let mut trie: LpmTrie<_, [u8; UDP_RULE_KEY_LEN], u8> = LpmTrie::try_from(
            ebpf.map_mut("UDP_RULES")
                .ok_or_else(|| missing("UDP_RULES"))?,
        )
        .map_err(map_err("UDP_RULES"))?;
        for (prefix, data, verdict) in entries {
            trie.insert(&Key::new(prefix, data), verdict, 0)
                .map_err(map_err("UDP_RULES"))?;
        }
        Ok(())
    }

    /// The table the resolver reads attribution from (once).
    pub fn dns_peers(&mut self) -> Result<DnsPeerTable, BpfError> {
        let map = self.ebpf.take_map("DNS_BY_PEER").ok_or(BpfError::Map {
            map: "DNS_BY_PEER",
            message: "missing from the object, or already taken".into(),
        })?;
        Ok(DnsPeerTable {
            map: Mutex::new(HashMap::try_from(map).map_err(map_err("DNS_BY_PEER"))?),
        })
    }
}

/// Whether a UDP datagram to `dst` would be refused by these rules (what
/// the kernel decides; for tests and `status`).
pub fn udp_refused(rules: &UdpRules, dst: SocketAddr) -> bool {
    let hit = |list: &[UdpRule], port_specific: bool| -> Option<u8> {
        list.iter()
            .filter(|r| r.port.is_some() == port_specific)
            .filter(|r| r.port.map_or(true, |p| p.contains(dst.port())))
            .filter(|r| r.net.map_or(true, |n| n.contains(&canonical(dst.ip()))))
            .map(|r| {
                r.net.map_or(0, |n| {
                    n.prefix_len() + if n.addr().is_ipv4() { 96 } else { 0 }
                })
            })
            .max()
    };
    for port_specific in [true, false] {
        let b = hit(&rules.block, port_specific);
        let a = hit(&rules.allow, port_specific);
        match (b, a) {
            (None, None) => continue,
            (Some(b), Some(a)) => return b > a,
            (Some(_), None) => return true,
            (None, Some(_)) => return false,
        }
    }
    false
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_canonical(),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(net: Option<&str>, port: Option<(u16, u16)>) -> UdpRule {
        UdpRule {
            net: net.map(|n| n.parse().unwrap()),
            port: port.map(|(start, end)| PortRange { start, end }),
        }
    }

    #[test]
    fn quic_everywhere_is_two_entries_one_per_family() {
        let e = udp_rule_entries(&UdpRules::default()).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].0, 16 + 96);
        assert_eq!(&e[0].1[..2], &443u16.to_be_bytes());
        assert_eq!(e[1].0, 16);
        assert!(e.iter().all(|x| x.2 == UDP_BLOCK));
    }

    #[test]
    fn port_ranges_expand_and_are_bounded() {
        let rules = UdpRules {
            block: vec![rule(Some("10.0.0.0/8"), Some((5000, 5009)))],
            allow: vec![],
        };
        assert_eq!(udp_rule_entries(&rules).unwrap().len(), 10);
        let huge = UdpRules {
            block: vec![rule(None, Some((1, 60000)))],
            allow: vec![],
        };
        assert!(udp_rule_entries(&huge).is_err());
    }

    #[test]
    fn exceptions_and_port_specific_rules_decide_like_the_kernel() {
        let rules = UdpRules {
            block: vec![rule(None, Some((443, 443))), rule(Some("10.0.0.0/8"), None)],
            allow: vec![rule(Some("127.0.0.0/8"), Some((443, 443)))],
        };
        assert!(udp_refused(&rules, "1.2.3.4:443".parse().unwrap()));
        assert!(!udp_refused(&rules, "127.0.0.2:443".parse().unwrap()));
        assert!(udp_refused(&rules, "10.1.1.1:9999".parse().unwrap()));
        assert!(!udp_refused(&rules, "1.2.3.4:9999".parse().unwrap()));
        assert!(udp_refused(&rules, "[::ffff:1.2.3.4]:443".parse().unwrap()));
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    fn policy_rule(name: &str, nets: &[&str], ports: &[(u16, u16)], allow: bool) -> UdpPolicyRule {
        UdpPolicyRule {
            name: name.into(),
            nets: nets.iter().map(|n| n.parse().unwrap()).collect(),
            ports: ports
                .iter()
                .map(|&(start, end)| PortRange { start, end })
                .collect(),
            allow,
        }
    }

    fn verdict(e: &UdpEntries, net: &str, port: u16) -> Option<u8> {
        let rules = UdpRules {
            block: vec![UdpRule {
                net: Some(net.parse().unwrap()),
                port: (port != 0).then_some(PortRange {
                    start: port,
                    end: port,
                }),
            }],
            allow: vec![],
        };
        let (prefix, key, _) = udp_rule_entries(&rules).unwrap()[0];
        e.get(&(prefix, key)).copied()
    }

    #[test]
    fn policy_rules_add_to_the_configuration_and_keep_the_quic_block() {
        let policy = [
            policy_rule("block-5", &["127.0.0.5/32"], &[(9000, 9000)], false),
            policy_rule("lan", &["10.0.0.0/8"], &[], false),
        ];
        let e = merged_udp_entries(&UdpRules::default(), &policy).unwrap();
        assert_eq!(e.len(), 4);
        assert_eq!(verdict(&e, "127.0.0.5/32", 9000), Some(UDP_BLOCK));
        assert_eq!(verdict(&e, "10.0.0.0/8", 0), Some(UDP_BLOCK));
        assert_eq!(verdict(&e, "0.0.0.0/0", 443), Some(UDP_BLOCK));
        assert_eq!(verdict(&e, "::/0", 443), Some(UDP_BLOCK));
    }

    #[test]
    fn for_the_same_destination_the_policy_beats_the_config_and_the_first_rule_wins() {
        let config = UdpRules {
            block: vec![UdpRule {
                net: Some("10.0.0.0/8".parse().unwrap()),
                port: None,
            }],
            allow: vec![],
        };
        let policy = [
            policy_rule("first", &["10.0.0.0/8"], &[], true),
            policy_rule("second", &["10.0.0.0/8"], &[], false),
        ];
        let e = merged_udp_entries(&config, &policy).unwrap();
        assert_eq!(verdict(&e, "10.0.0.0/8", 0), Some(UDP_ALLOW));
        // Without the policy, the config's block is back.
        let e = merged_udp_entries(&config, &[]).unwrap();
        assert_eq!(verdict(&e, "10.0.0.0/8", 0), Some(UDP_BLOCK));
    }

    #[test]
    fn too_many_entries_together_are_an_error() {
        let policy = [
            policy_rule("a", &[], &[(1, 2000)], false),
            policy_rule("b", &[], &[(3001, 4000)], false),
        ];
        let e = merged_udp_entries(&UdpRules::default(), &policy).unwrap_err();
        assert!(e.contains("policy"), "{e}");
    }
}
