//! Picking an IM server for a user (the seed's duty 3): least-loaded (the
//! default), round-robin, or consistent hashing on the uid.
//!
//! A worker's [`Picker`] is rebuilt from the registry cache once per cache
//! generation ([`Picker::sync`]), never per request: the non-draining
//! servers sorted by member, each with its member string and the
//! pre-serialised prefix of its `/route` answer ([`Slot::answer_prefix`]),
//! a min-heap for least-loaded, and (for consistent hashing) the ring.
//! A pick then costs O(1) (round-robin), O(log n) (least-loaded: one
//! sift-down of the heap's root) or O(log(160 n)) (consistent hashing: one
//! SHA-256 of the uid and a binary search), and allocates nothing.
//!
//! Loads come from the IM servers' heartbeats, seconds old. So that a burst
//! of `/route` calls does not send everyone to the same "least loaded"
//! server, each worker adds the users it has routed to a server since that
//! server's last load report (reset when a new load arrives). Among equal
//! loads the server picked longest ago wins, so equal servers take turns.
//!
//! The ring (160 virtual nodes per server, SHA-256 positions of
//! `<member>#<i>`, ties broken by member order) is the same on every Route
//! worker and node. It is rebuilt only when the set of servers changes, and
//! a server's positions are hashed once while it stays registered.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::cluster::servers::ServerEntry;
use crate::route::settings::Balancer;

/// Virtual nodes per server on the hash ring.
const VNODES: usize = 160;
/// Bits of a ring position that index [`Picker::ring_index`].
const INDEX_BITS: u32 = 16;

fn hash64(s: &[u8]) -> u64 {
    let d = Sha256::digest(s);
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// The 160 ring positions of `member`. O(160) hashes.
fn positions(member: &str) -> Box<[u64]> {
    (0..VNODES)
        .map(|i| hash64(format!("{member}#{i}").as_bytes()))
        .collect()
}

/// One pickable (non-draining) server, as the picker keeps it.
#[derive(Debug, Clone)]
pub struct Slot {
    /// The seed-encoded member (`{"ip":…,"port":N}`), for the uid →
    /// server record.
    pub member: Arc<str>,
    /// serviceName.
    pub service_name: String,
    /// Advertised IP.
    pub ip: String,
    /// Advertised port.
    pub port: u16,
    /// Load last reported.
    pub load: u64,
    /// Users this worker routed here since that report.
    pub routed: u64,
    /// `{"ip":…,"port":N,"serviceName":…,"url":"ws://ip:port/?uid=`: the
    /// `/route` answer up to the uid (see [`Slot::answer`]).
    pub answer_prefix: String,
}

impl Slot {
    fn new(e: &ServerEntry) -> Slot {
        let url = serde_json::to_string(&format!("ws://{}:{}/?uid=", e.ip, e.port))
            .unwrap_or_else(|_| "\"".into());
        let url_open = url.strip_suffix('"').unwrap_or(&url);
        let answer_prefix = format!(
            "{{\"ip\":{},\"port\":{},\"serviceName\":{},\"url\":{url_open}",
            serde_json::to_string(&e.ip).unwrap_or_default(),
            e.port,
            serde_json::to_string(&e.service_name).unwrap_or_default(),
        );
        Slot {
            member: Arc::from(e.member()),
            service_name: e.service_name.clone(),
            ip: e.ip.clone(),
            port: e.port,
            load: e.load,
            routed: 0,
            answer_prefix,
        }
    }

    /// The `/route` answer for `uid` (already validated: `[A-Za-z0-9_.@:-]`)
    /// and `token` (base64url and dots, or empty): the prefix plus the
    /// uid-dependent tail, in one allocation. O(answer length).
    pub fn answer(&self, uid: &str, token: &str) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(self.answer_prefix.len() + uid.len() + 2 * token.len() + 32);
        out.extend_from_slice(self.answer_prefix.as_bytes());
        out.extend_from_slice(uid.as_bytes());
        if !token.is_empty() {
            out.extend_from_slice(b"&token=");
            out.extend_from_slice(token.as_bytes());
        }
        out.extend_from_slice(b"\",\"token\":\"");
        out.extend_from_slice(token.as_bytes());
        out.extend_from_slice(b"\"}");
        out
    }
}

/// A worker's balancer state (see the module doc).
#[derive(Debug, Default)]
pub struct Picker {
    /// The cache generation the slots were built from (`None`: never, or
    /// built from an uncached list).
    generation: Option<u64>,
    /// The pickable servers, sorted by member.
    slots: Vec<Slot>,
    /// Round-robin counter.
    rr: usize,
    /// Least-loaded min-heap of (load + routed, last-picked sequence, slot).
    heap: Vec<(u64, u64, u32)>,
    /// Sequence numbers for the heap's tie-break.
    seq: u64,
    /// The ring: (position, slot), sorted; empty until a consistent-hash
    /// pick needs it.
    ring: Vec<(u64, u32)>,
    /// `ring_index[b]`: the first ring entry whose position's top
    /// [`INDEX_BITS`] bits are ≥ b (`2^INDEX_BITS + 1` entries), so that a
    /// lookup binary-searches one bucket (≈ 25 entries at 10,000 servers)
    /// instead of the whole ring (25 MB at 10,000 servers: one cache miss
    /// per step).
    ring_index: Vec<u32>,
    /// Whether `ring` matches `slots`.
    ring_valid: bool,
    /// member → ring positions, kept while the member stays registered.
    positions: HashMap<Arc<str>, Box<[u64]>>,
}

impl Picker {
    /// Brings the picker up to date with `entries` of cache generation
    /// `generation` (`None`: an uncached list, always taken). Nothing
    /// happens when the generation is the one already built. Otherwise
    /// O(n log n): the slots are rebuilt (keeping each server's routed
    /// count while its load is unchanged), the heap re-heapified, and the
    /// ring invalidated only if the set of servers changed.
    pub fn sync(&mut self, generation: Option<u64>, entries: &[ServerEntry]) {
        if generation.is_some() && generation == self.generation {
            return;
        }
        self.generation = generation;
        let mut live: Vec<&ServerEntry> = entries.iter().filter(|e| !e.draining).collect();
        live.sort_unstable_by(|a, b| a.member().cmp(b.member()));
        live.dedup_by(|a, b| a.member() == b.member());
        let same_set = live.len() == self.slots.len()
            && live
                .iter()
                .zip(&self.slots)
                .all(|(e, s)| e.member() == &*s.member && e.service_name == s.service_name);
        if same_set {
            let mut changed = false;
            for (e, s) in live.iter().zip(self.slots.iter_mut()) {
                if e.load != s.load {
                    s.load = e.load;
                    s.routed = 0;
                    changed = true;
                }
            }
            if changed {
                self.rebuild_heap();
            }
            return;
        }
        let old: HashMap<Arc<str>, (u64, u64)> = self
            .slots
            .drain(..)
            .map(|s| (s.member, (s.load, s.routed)))
            .collect();
        self.slots = live
            .iter()
            .map(|e| {
                let mut s = Slot::new(e);
                if let Some((load, routed)) = old.get(&s.member) {
                    if *load == s.load {
                        s.routed = *routed;
                    }
                }
                s
            })
            .collect();
        self.ring_valid = false;
        self.rebuild_heap();
    }

    /// The pickable servers, sorted by member.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Picks a server for `uid`; returns its slot. `None` when no server
    /// is pickable. See the module doc for the costs.
    pub fn pick(&mut self, kind: Balancer, uid: &str) -> Option<&Slot> {
        if self.slots.is_empty() {
            return None;
        }
        let idx = match kind {
            Balancer::RoundRobin => {
                self.rr = self.rr.wrapping_add(1);
                self.rr % self.slots.len()
            }
            Balancer::LeastLoaded => {
                let (_, _, idx) = *self.heap.first()?;
                let s = self.slots.get_mut(idx as usize)?;
                s.routed += 1;
                self.seq += 1;
                self.heap[0] = (s.load + s.routed, self.seq, idx);
                self.sift_down(0);
                return self.slots.get(idx as usize);
            }
            Balancer::ConsistentHash => {
                self.ensure_ring();
                let h = hash64(uid.as_bytes());
                self.ring_lookup(h)?
            }
        };
        // Round-robin and consistent hashing count too (the heap is only
        // read by least-loaded picks, and rebuilt at each generation).
        let s = self.slots.get_mut(idx)?;
        s.routed += 1;
        Some(s)
    }

    fn rebuild_heap(&mut self) {
        self.heap.clear();
        self.heap.extend(
            self.slots
                .iter()
                .enumerate()
                .map(|(i, s)| (s.load + s.routed, i as u64, i as u32)),
        );
        self.seq = self.heap.len() as u64;
        for i in (0..self.heap.len() / 2).rev() {
            self.sift_down(i);
        }
    }

    fn sift_down(&mut self, mut i: usize) {
        let n = self.heap.len();
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut m = i;
            if l < n && self.heap[l] < self.heap[m] {
                m = l;
            }
            if r < n && self.heap[r] < self.heap[m] {
                m = r;
            }
            if m == i {
                return;
            }
            self.heap.swap(i, m);
            i = m;
        }
    }

    /// The slot owning ring position `h`: the first virtual node at or
    /// after `h`, wrapping. O(log(bucket)) through [`Picker::ring_index`].
    fn ring_lookup(&self, h: u64) -> Option<usize> {
        let b = (h >> (64 - INDEX_BITS)) as usize;
        let lo = *self.ring_index.get(b)? as usize;
        let hi = *self.ring_index.get(b + 1)? as usize;
        let at = lo + self.ring.get(lo..hi)?.partition_point(|(p, _)| *p < h);
        let at = if at == self.ring.len() { 0 } else { at };
        self.ring.get(at).map(|e| e.1 as usize)
    }

    /// Builds the ring for the current slots if it is out of date:
    /// O(160 n log(160 n)), hashing only servers new since the last build.
    fn ensure_ring(&mut self) {
        if self.ring_valid {
            return;
        }
        let current: std::collections::HashSet<&str> =
            self.slots.iter().map(|s| &*s.member).collect();
        self.positions.retain(|m, _| current.contains(&**m));
        self.ring.clear();
        self.ring.reserve(self.slots.len() * VNODES);
        for (i, s) in self.slots.iter().enumerate() {
            let pos = self
                .positions
                .entry(s.member.clone())
                .or_insert_with(|| positions(&s.member));
            self.ring.extend(pos.iter().map(|p| (*p, i as u32)));
        }
        // Slots are in member order, so (position, slot) is (position, member).
        self.ring.sort_unstable();
        let buckets = 1usize << INDEX_BITS;
        self.ring_index.clear();
        self.ring_index.reserve(buckets + 1);
        let mut at = 0usize;
        for b in 0..=buckets {
            while at < self.ring.len() && ((self.ring[at].0 >> (64 - INDEX_BITS)) as usize) < b {
                at += 1;
            }
            self.ring_index.push(at as u32);
        }
        self.ring_valid = true;
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
            member_cache: Default::default(),
        }
    }

    fn servers(n: u16) -> Vec<ServerEntry> {
        (1..=n).map(|p| entry(p, 0)).collect()
    }

    fn pick(p: &mut Picker, kind: Balancer, uid: &str) -> u16 {
        p.pick(kind, uid).expect("a server").port
    }

    #[test]
    fn the_answer_is_the_json_of_the_old_code() {
        let e = entry(9000, 0);
        let s = Slot::new(&e);
        let v: serde_json::Value = serde_json::from_slice(&s.answer("u1", "a.b_c")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ip": "127.0.0.2", "port": 9000, "serviceName": "IM_9000",
                "url": "ws://127.0.0.2:9000/?uid=u1&token=a.b_c", "token": "a.b_c"})
        );
        let v: serde_json::Value = serde_json::from_slice(&s.answer("u1", "")).unwrap();
        assert_eq!(v["url"], "ws://127.0.0.2:9000/?uid=u1");
        assert_eq!(v["token"], "");
    }

    #[test]
    fn least_loaded_spreads_a_burst_and_skips_draining() {
        let mut servers = vec![entry(1, 10), entry(2, 0), entry(3, 0)];
        servers[2].draining = true;
        let mut p = Picker::default();
        p.sync(Some(1), &servers);
        let picks: Vec<u16> = (0..20)
            .map(|i| pick(&mut p, Balancer::LeastLoaded, &format!("u{i}")))
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

    /// Each balancer after add, remove and load change, at 1, 100 and
    /// 10,000 servers.
    #[test]
    fn every_balancer_follows_registry_changes_at_1_100_and_10000_servers() {
        for n in [1u16, 100, 10_000] {
            let mut list = servers(n);
            for kind in [
                Balancer::LeastLoaded,
                Balancer::RoundRobin,
                Balancer::ConsistentHash,
            ] {
                let mut p = Picker::default();
                p.sync(Some(1), &list);
                let got: std::collections::HashSet<u16> = (0..200)
                    .map(|i| pick(&mut p, kind, &format!("u{i}")))
                    .collect();
                assert!(got.iter().all(|x| (1..=n).contains(x)), "{kind:?} n={n}");
                if kind != Balancer::ConsistentHash {
                    assert_eq!(got.len(), usize::from(n).min(200), "{kind:?} n={n} spreads");
                }
                // Remove all but one: only that one is picked.
                let only = vec![list[usize::from(n) / 2].clone()];
                p.sync(Some(2), &only);
                for i in 0..50 {
                    assert_eq!(
                        pick(&mut p, kind, &format!("u{i}")),
                        only[0].port,
                        "{kind:?} n={n}"
                    );
                }
                // Add one back (a new port): both are picked.
                let mut two = only.clone();
                two.push(entry(n + 1, 0));
                p.sync(Some(3), &two);
                let got: std::collections::HashSet<u16> = (0..400)
                    .map(|i| pick(&mut p, kind, &format!("v{i}")))
                    .collect();
                assert_eq!(got.len(), 2, "{kind:?} n={n}: {got:?}");
            }
            // Load change: every server but the last reports 1,000,000 users.
            for e in list.iter_mut().take(usize::from(n) - 1) {
                e.load = 1_000_000;
            }
            let mut p = Picker::default();
            p.sync(Some(1), &servers(n));
            for i in 0..10 {
                pick(&mut p, Balancer::LeastLoaded, &format!("w{i}"));
            }
            p.sync(Some(2), &list);
            for i in 0..100 {
                assert_eq!(
                    pick(&mut p, Balancer::LeastLoaded, &format!("w{i}")),
                    n,
                    "n={n}"
                );
            }
            // The same generation again is not re-read.
            p.sync(Some(2), &servers(n));
            assert_eq!(pick(&mut p, Balancer::LeastLoaded, "x"), n);
        }
    }

    #[test]
    fn least_loaded_spreads_10000_users_within_5_percent() {
        for n in [10u16, 100] {
            let mut p = Picker::default();
            p.sync(Some(1), &servers(n));
            let mut count = vec![0u32; usize::from(n) + 1];
            for i in 0..10_000 {
                count[usize::from(pick(&mut p, Balancer::LeastLoaded, &format!("u{i}")))] += 1;
            }
            let fair = 10_000.0 / f64::from(n);
            for c in &count[1..] {
                let dev = (f64::from(*c) - fair).abs() / fair;
                assert!(dev <= 0.05, "n={n}: {c} users against {fair} ({count:?})");
            }
        }
    }

    #[test]
    fn consistent_hash_is_sticky_and_moves_about_1_over_n() {
        for n in [3u16, 10, 100] {
            let all = servers(n);
            let mut p = Picker::default();
            p.sync(Some(1), &all);
            let uids: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
            let first: Vec<u16> = uids
                .iter()
                .map(|u| pick(&mut p, Balancer::ConsistentHash, u))
                .collect();
            let again: Vec<u16> = uids
                .iter()
                .map(|u| pick(&mut p, Balancer::ConsistentHash, u))
                .collect();
            assert_eq!(first, again, "sticky");
            let gone = n / 2 + 1;
            let rest: Vec<ServerEntry> = all.iter().filter(|e| e.port != gone).cloned().collect();
            p.sync(Some(2), &rest);
            let after: Vec<u16> = uids
                .iter()
                .map(|u| pick(&mut p, Balancer::ConsistentHash, u))
                .collect();
            let moved = first.iter().zip(&after).filter(|(a, b)| a != b).count();
            let wrongly = first
                .iter()
                .zip(&after)
                .filter(|(a, b)| a != b && **a != gone)
                .count();
            assert_eq!(wrongly, 0, "only the removed server's users move");
            let share = moved as f64 / uids.len() as f64;
            assert!(
                share <= 1.5 / f64::from(n),
                "n={n}: {share} of the uids moved"
            );
            assert!(share > 0.0);
        }
    }

    #[test]
    fn the_ring_index_finds_what_a_full_binary_search_finds() {
        let mut p = Picker::default();
        p.sync(Some(1), &servers(50));
        p.ensure_ring();
        let full = |h: u64| {
            let at = p.ring.partition_point(|(q, _)| *q < h) % p.ring.len();
            p.ring[at].1 as usize
        };
        let edges = [
            0,
            1,
            u64::MAX,
            p.ring[0].0,
            p.ring[p.ring.len() - 1].0,
            p.ring[7].0 + 1,
        ];
        for h in edges
            .into_iter()
            .chain((0..20_000u64).map(|i| hash64(&i.to_be_bytes())))
        {
            assert_eq!(p.ring_lookup(h), Some(full(h)), "position {h}");
        }
    }

    #[test]
    fn the_member_is_cached_and_equality_ignores_the_cache() {
        let (a, b) = (entry(9, 0), entry(9, 0));
        assert_eq!(a.member(), r#"{"ip":"127.0.0.2","port":9}"#);
        assert!(std::ptr::eq(a.member(), a.member()), "computed once");
        assert_eq!(a, b, "b has not computed its member");
    }

    #[test]
    fn round_robin_cycles() {
        let mut p = Picker::default();
        p.sync(Some(1), &servers(2));
        let picks: Vec<u16> = (0..4)
            .map(|_| pick(&mut p, Balancer::RoundRobin, "u"))
            .collect();
        assert_eq!(picks.iter().filter(|&&x| x == 1).count(), 2);
    }

    #[test]
    fn nothing_to_pick_is_none() {
        let mut p = Picker::default();
        p.sync(None, &[]);
        assert!(p.pick(Balancer::LeastLoaded, "u").is_none());
        let mut d = entry(1, 0);
        d.draining = true;
        p.sync(None, &[d]);
        assert!(p.pick(Balancer::ConsistentHash, "u").is_none());
    }
}
