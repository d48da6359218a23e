//! Picking an IM server for a user (the seed's duty 3): least-loaded (the
//! default), round-robin, or consistent hashing on the uid.
//!
//! Loads come from the IM servers' heartbeats, seconds old. So that a burst
//! of `/route` calls does not send everyone to the same "least loaded"
//! server, each worker adds the users it has assigned to a server since that
//! server's last report. The consistent-hash ring (160 virtual nodes per
//! server, SHA-256 positions, the same on every Route worker and node) is
//! rebuilt only when the set of servers changes.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::cluster::servers::ServerEntry;
use crate::route::settings::Balancer;

/// Virtual nodes per server on the hash ring.
const VNODES: usize = 160;

fn hash64(s: &str) -> u64 {
    let d = Sha256::digest(s.as_bytes());
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// A worker's balancer state.
#[derive(Debug, Default)]
pub struct Picker {
    rr: usize,
    /// member → (load last reported, users assigned since).
    assigned: HashMap<String, (u64, u64)>,
    /// The ring and the member list it was built for.
    ring: Vec<(u64, String)>,
    ring_members: Vec<String>,
}

impl Picker {
    /// Picks a server for `uid` among the non-draining `servers`.
    pub fn pick<'a>(
        &mut self,
        kind: Balancer,
        servers: &'a [ServerEntry],
        uid: &str,
    ) -> Option<&'a ServerEntry> {
        let mut live: Vec<&ServerEntry> = servers.iter().filter(|e| !e.draining).collect();
        if live.is_empty() {
            return None;
        }
        live.sort_by_key(|e| e.member());
        let chosen = match kind {
            Balancer::RoundRobin => {
                self.rr = self.rr.wrapping_add(1);
                live[self.rr % live.len()]
            }
            Balancer::LeastLoaded => {
                self.rr = self.rr.wrapping_add(1);
                let n = live.len();
                let eff =
                    |e: &ServerEntry, a: &HashMap<String, (u64, u64)>| match a.get(&e.member()) {
                        Some((base, extra)) if *base == e.load => e.load + extra,
                        _ => e.load,
                    };
                let start = self.rr % n;
                let mut best = live[start];
                for i in 1..n {
                    let e = live[(start + i) % n];
                    if eff(e, &self.assigned) < eff(best, &self.assigned) {
                        best = e;
                    }
                }
                best
            }
            Balancer::ConsistentHash => {
                let members: Vec<String> = live.iter().map(|e| e.member()).collect();
                if members != self.ring_members {
                    self.ring = members
                        .iter()
                        .flat_map(|m| {
                            (0..VNODES).map(move |i| (hash64(&format!("{m}#{i}")), m.clone()))
                        })
                        .collect();
                    self.ring.sort();
                    self.ring_members = members;
                }
                let h = hash64(uid);
                let idx = self.ring.partition_point(|(p, _)| *p < h) % self.ring.len();
                let m = &self.ring[idx].1;
                live.iter().find(|e| &e.member() == m).copied()?
            }
        };
        let slot = self
            .assigned
            .entry(chosen.member())
            .or_insert((chosen.load, 0));
        if slot.0 != chosen.load {
            *slot = (chosen.load, 0);
        }
        slot.1 += 1;
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(port: u16, load: u64) -> ServerEntry {
        ServerEntry {
            service_name: format!("IM_{port}"),
            ip: "127.0.0.2".into(),
            port,
            load,
            epoch: "e".into(),
            registered_at_ms: 0,
            last_seen_ms: 0,
            node: "n".into(),
            worker: 0,
            owner: "o".into(),
            draining: false,
        }
    }

    #[test]
    fn least_loaded_spreads_a_burst_and_skips_draining() {
        let mut servers = vec![entry(1, 10), entry(2, 0), entry(3, 0)];
        servers[2].draining = true;
        let mut p = Picker::default();
        let picks: Vec<u16> = (0..20)
            .map(|i| {
                p.pick(Balancer::LeastLoaded, &servers, &format!("u{i}"))
                    .unwrap()
                    .port
            })
            .collect();
        assert_eq!(
            picks.iter().filter(|&&x| x == 3).count(),
            0,
            "draining never picked"
        );
        assert_eq!(
            picks.iter().filter(|&&x| x == 2).count(),
            15,
            "the empty server fills up to the loaded one first: {picks:?}"
        );
    }

    #[test]
    fn consistent_hash_is_sticky_and_moves_little() {
        let three = vec![entry(1, 0), entry(2, 0), entry(3, 0)];
        let mut p = Picker::default();
        let first: Vec<u16> = (0..300)
            .map(|i| {
                p.pick(Balancer::ConsistentHash, &three, &format!("u{i}"))
                    .unwrap()
                    .port
            })
            .collect();
        let again: Vec<u16> = (0..300)
            .map(|i| {
                p.pick(Balancer::ConsistentHash, &three, &format!("u{i}"))
                    .unwrap()
                    .port
            })
            .collect();
        assert_eq!(first, again);
        let two = vec![entry(1, 0), entry(2, 0)];
        let after: Vec<u16> = (0..300)
            .map(|i| {
                p.pick(Balancer::ConsistentHash, &two, &format!("u{i}"))
                    .unwrap()
                    .port
            })
            .collect();
        let moved = first
            .iter()
            .zip(&after)
            .filter(|(a, b)| a != b && **a != 3)
            .count();
        assert_eq!(moved, 0, "only the removed server's users move");
        assert!(first.iter().all(|p| [1, 2, 3].contains(p)));
    }

    #[test]
    fn round_robin_cycles() {
        let s = vec![entry(1, 0), entry(2, 0)];
        let mut p = Picker::default();
        let picks: Vec<u16> = (0..4)
            .map(|_| p.pick(Balancer::RoundRobin, &s, "u").unwrap().port)
            .collect();
        assert_eq!(picks.iter().filter(|&&x| x == 1).count(), 2);
    }
}
