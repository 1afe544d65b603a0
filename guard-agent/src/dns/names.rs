//! The IP → names map: which host names resolved to an address, learnt from
//! the answers the agent's resolver forwarded, so that connections without
//! SNI or Host (SSH, databases, raw TCP) are recorded and matched by name.
//!
//! Bounded (LRU over addresses, a few names per address) and TTL-aware: a
//! name is kept for its record's TTL, but at least [`MIN_KEEP`] (clients
//! connect after short TTLs have run out) and at most [`MAX_KEEP`]. It is
//! host-wide: an address resolved by one process names the connections of
//! all. It must never be used to allow what the address alone would not:
//! it only adds a name to what policy sees.

use std::{
    net::IpAddr,
    num::NonZeroUsize,
    sync::Mutex,
    time::{Duration, Instant},
};

use lru::LruCache;

/// Shortest time a name is kept, whatever its TTL.
pub const MIN_KEEP: Duration = Duration::from_secs(60);
/// Longest time a name is kept, whatever its TTL.
pub const MAX_KEEP: Duration = Duration::from_secs(24 * 3600);
/// Names remembered per address (the most recent win).
pub const NAMES_PER_ADDRESS: usize = 8;
/// Addresses remembered by default.
pub const DEFAULT_CAPACITY: usize = 65536;

/// IP → the names that resolved to it, with their expiry.
pub struct NameMap {
    inner: Mutex<LruCache<IpAddr, Vec<(String, Instant)>>>,
}

impl Default for NameMap {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl NameMap {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(LruCache::new(
                NonZeroUsize::new(capacity.max(1)).expect("at least one"),
            )),
        }
    }

    /// Records that `name` resolved to `ip` with this TTL, as of `now`.
    pub fn insert(&self, ip: IpAddr, name: &str, ttl: Duration, now: Instant) {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if name.is_empty() {
            return;
        }
        let expires = now + ttl.clamp(MIN_KEEP, MAX_KEEP);
        let ip = canonical(ip);
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let names = map.get_or_insert_mut(ip, Vec::new);
        names.retain(|(n, exp)| *n != name && *exp > now);
        names.push((name, expires));
        if names.len() > NAMES_PER_ADDRESS {
            names.remove(0);
        }
    }

    /// The most recently resolved, unexpired name for `ip`.
    pub fn name_for(&self, ip: IpAddr, now: Instant) -> Option<String> {
        self.names_for(ip, now).pop()
    }

    /// All unexpired names for `ip`, oldest first.
    pub fn names_for(&self, ip: IpAddr, now: Instant) -> Vec<String> {
        let ip = canonical(ip);
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(names) = map.get_mut(&ip) else {
            return Vec::new();
        };
        names.retain(|(_, exp)| *exp > now);
        let out: Vec<String> = names.iter().map(|(n, _)| n.clone()).collect();
        if out.is_empty() {
            map.pop(&ip);
        }
        out
    }

    /// Addresses held.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `::ffff:a.b.c.d` and `a.b.c.d` are one address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_canonical(),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_resolved_name_is_found_by_address_in_either_form() {
        let m = NameMap::new(16);
        let now = Instant::now();
        m.insert(
            ip("127.0.0.9"),
            "DB.Internal.Example.",
            Duration::from_secs(300),
            now,
        );
        assert_eq!(
            m.name_for(ip("127.0.0.9"), now).as_deref(),
            Some("db.internal.example")
        );
        assert_eq!(
            m.name_for(ip("::ffff:127.0.0.9"), now).as_deref(),
            Some("db.internal.example")
        );
        assert_eq!(m.name_for(ip("127.0.0.10"), now), None);
    }

    #[test]
    fn names_expire_after_their_ttl_but_not_before_the_minimum() {
        let m = NameMap::new(16);
        let now = Instant::now();
        m.insert(ip("10.0.0.1"), "short.example", Duration::from_secs(1), now);
        m.insert(
            ip("10.0.0.2"),
            "long.example",
            Duration::from_secs(600),
            now,
        );
        // A 1 s TTL is kept for MIN_KEEP.
        assert!(m
            .name_for(ip("10.0.0.1"), now + Duration::from_secs(30))
            .is_some());
        assert!(m
            .name_for(ip("10.0.0.1"), now + MIN_KEEP + Duration::from_secs(1))
            .is_none());
        assert!(m
            .name_for(ip("10.0.0.2"), now + Duration::from_secs(599))
            .is_some());
        assert!(m
            .name_for(ip("10.0.0.2"), now + Duration::from_secs(601))
            .is_none());
        // Addresses whose names all expired are dropped from the map.
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn the_map_is_bounded_in_addresses_and_names() {
        let m = NameMap::new(4);
        let now = Instant::now();
        for i in 0..10u8 {
            m.insert(
                IpAddr::from([10, 0, 0, i]),
                "x.example",
                Duration::from_secs(60),
                now,
            );
        }
        assert_eq!(m.len(), 4);
        assert!(m.name_for(ip("10.0.0.0"), now).is_none(), "oldest evicted");
        assert!(m.name_for(ip("10.0.0.9"), now).is_some());

        for i in 0..(NAMES_PER_ADDRESS + 3) {
            m.insert(
                ip("10.0.0.9"),
                &format!("n{i}.example"),
                Duration::from_secs(60),
                now,
            );
        }
        let names = m.names_for(ip("10.0.0.9"), now);
        assert_eq!(names.len(), NAMES_PER_ADDRESS);
        assert_eq!(
            names.last().unwrap(),
            &format!("n{}.example", NAMES_PER_ADDRESS + 2)
        );
    }

    #[test]
    fn re_resolving_a_name_refreshes_it_without_duplicates() {
        let m = NameMap::new(4);
        let now = Instant::now();
        m.insert(ip("10.0.0.1"), "a.example", Duration::from_secs(60), now);
        m.insert(ip("10.0.0.1"), "b.example", Duration::from_secs(60), now);
        m.insert(ip("10.0.0.1"), "a.example", Duration::from_secs(120), now);
        assert_eq!(
            m.names_for(ip("10.0.0.1"), now),
            vec!["b.example", "a.example"]
        );
        assert_eq!(
            m.name_for(ip("10.0.0.1"), now + Duration::from_secs(90))
                .as_deref(),
            Some("a.example")
        );
    }
}
