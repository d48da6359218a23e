//! Where users are, as this Route worker last learned it: a cache of
//! presence records per uid, so the common message costs no Redis round
//! trip, and the queue of messages waiting for a lookup, so messages to a
//! user keep their order while one is under way.
//!
//! The cache is kept *current*, not merely recent: every IM server
//! publishes a presence event when a user connects or leaves, and each
//! event evicts the uid here ([`Locations::invalidate`]). A lookup that
//! was under way when such an event arrived is used for the messages
//! that waited on it but not cached. Records are checked against the
//! registry (same server, same instance epoch) every time they are used,
//! so a dead or restarted server's users are never served from here.
//! When the subscriber link that carries the events reconnects, events
//! may have been missed, and the owner clears the whole cache.

use std::collections::HashMap;
use std::time::Instant;

/// Most uids cached; past it the cache starts over (cheaper than an LRU,
/// and a miss only costs one HGETALL).
pub const MAX_CACHED: usize = 200_000;

/// A cached location is looked up again after this long, whatever the
/// events said: a bound on how long a missed invalidation can misroute.
pub const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(5);

/// A lookup under way and the messages waiting for it, in arrival order.
#[derive(Debug)]
struct Lookup<M> {
    waiting: Vec<M>, // in arrival order
    stale: bool,     // an event for the uid came meanwhile: do not cache
}

/// The cache and the waiting messages; `R` is a presence record, `M` a
/// message to deliver.
#[derive(Debug)]
pub struct Locations<R, M> {
    cache: HashMap<String, (Instant, Vec<R>)>, // uid → (when looked up, records)
    lookups: HashMap<String, Lookup<M>>,       // uid → lookup under way
    hits: u64,                                 // answered from the cache
    misses: u64,                               // needed a lookup
}

impl<R, M> Default for Locations<R, M> {
    fn default() -> Self {
        Locations {
            cache: HashMap::new(),
            lookups: HashMap::new(),
            hits: 0,
            misses: 0,
        }
    }
}

/// What to do with a message for a uid.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a, R> {
    /// Known: deliver to these records now.
    Known(&'a [R]),
    /// Not known: the caller sends the lookup (one per uid at a time).
    Lookup,
    /// A lookup is under way: the message waits behind it.
    Queued,
}

impl<R, M> Locations<R, M> {
    /// Where `uid` is, or what to do about `msg`: it is queued (and
    /// returned later by [`Locations::finish`]) unless the answer is
    /// [`Route::Known`], in which case it is handed back untouched.
    /// O(1).
    pub fn route(&mut self, uid: &str, msg: M) -> (Route<'_, R>, Option<M>) {
        if let Some(l) = self.lookups.get_mut(uid) {
            l.waiting.push(msg);
            return (Route::Queued, None);
        }
        if self
            .cache
            .get(uid)
            .is_some_and(|(at, _)| at.elapsed() <= MAX_AGE)
        {
            self.hits += 1;
            let recs = self
                .cache
                .get(uid)
                .map(|(_, r)| r.as_slice())
                .unwrap_or(&[]);
            return (Route::Known(recs), Some(msg));
        }
        self.cache.remove(uid);
        self.misses += 1;
        self.lookups.insert(
            uid.to_string(),
            Lookup {
                waiting: vec![msg],
                stale: false,
            },
        );
        (Route::Lookup, None)
    }

    /// The lookup for `uid` answered `records` (`None`: it failed). Returns
    /// the messages that waited, in order, with the answer; caches it
    /// unless an event made it stale meanwhile, it failed, or it is empty.
    pub fn finish(&mut self, uid: &str, records: Option<Vec<R>>) -> (Vec<M>, Option<Vec<R>>)
    where
        R: Clone,
    {
        let Some(l) = self.lookups.remove(uid) else {
            return (Vec::new(), records);
        };
        match records {
            // "Online nowhere" is not kept: presence written back after a
            // Redis restart announces nothing, and a miss costs one HGETALL.
            Some(r) if !l.stale && !r.is_empty() => {
                if self.cache.len() >= MAX_CACHED {
                    self.cache.clear();
                }
                self.cache
                    .insert(uid.to_string(), (Instant::now(), r.clone()));
                (l.waiting, Some(r))
            }
            other => (l.waiting, other),
        }
    }

    /// A presence event for `uid`: forget what is known about it.
    pub fn invalidate(&mut self, uid: &str) {
        self.cache.remove(uid);
        if let Some(l) = self.lookups.get_mut(uid) {
            l.stale = true;
        }
    }

    /// Forget everything (events may have been missed). Lookups under way
    /// are kept, marked stale.
    pub fn clear(&mut self) {
        self.cache.clear();
        for l in self.lookups.values_mut() {
            l.stale = true;
        }
    }

    /// (hits, misses, cached uids, lookups under way), for metrics.
    pub fn stats(&self) -> (u64, u64, usize, usize) {
        (self.hits, self.misses, self.cache.len(), self.lookups.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_miss_queues_and_a_hit_answers() {
        let mut l: Locations<&str, u32> = Locations::default();
        assert_eq!(l.route("u", 1).0, Route::Lookup);
        assert_eq!(l.route("u", 2).0, Route::Queued);
        assert_eq!(l.route("u", 3).0, Route::Queued);
        let (waiting, recs) = l.finish("u", Some(vec!["im1"]));
        assert_eq!(waiting, vec![1, 2, 3], "in arrival order");
        assert_eq!(recs, Some(vec!["im1"]));
        let (r, back) = l.route("u", 4);
        assert_eq!(r, Route::Known(&["im1"][..]));
        assert_eq!(back, Some(4));
        assert_eq!(l.stats().0, 1);
    }

    #[test]
    fn an_event_during_a_lookup_keeps_it_out_of_the_cache() {
        let mut l: Locations<&str, u32> = Locations::default();
        assert_eq!(l.route("u", 1).0, Route::Lookup);
        l.invalidate("u");
        let (waiting, recs) = l.finish("u", Some(vec!["old"]));
        assert_eq!((waiting, recs), (vec![1], Some(vec!["old"])));
        assert_eq!(l.route("u", 2).0, Route::Lookup, "not cached");
    }

    #[test]
    fn events_and_clear_evict() {
        let mut l: Locations<&str, u32> = Locations::default();
        l.route("u", 1);
        l.finish("u", Some(vec![]));
        assert_eq!(l.route("u", 2).0, Route::Lookup, "offline is not cached");
        l.finish("u", Some(vec!["x"]));
        assert!(matches!(l.route("u", 2).0, Route::Known(_)));
        l.invalidate("u");
        assert_eq!(l.route("u", 3).0, Route::Lookup);
        l.finish("u", Some(vec!["a"]));
        l.clear();
        assert_eq!(l.route("u", 4).0, Route::Lookup);
        let (w, r) = l.finish("u", None);
        assert_eq!(
            (w, r),
            (vec![4], None),
            "a failed lookup hands back what waited"
        );
    }
}
