//! The timer wheel: a hashed wheel of `SLOTS` buckets, each `RESOLUTION`
//! wide, on the monotonic clock. It owns every timer of one worker (the
//! application's `tick`/`after` and the reactor's own deadlines).
//!
//! Costs: insert O(1) (push onto a bucket), cancel O(1) (a hash lookup that
//! only marks the entry; the bucket drops it when the wheel next passes it),
//! expiry O(entries in the buckets passed), `next_deadline` O(SLOTS) worst
//! case (a scan of bucket lengths, no entries touched). Ids come from a
//! counter and are never reused.
//!
//! Running a callback is three steps so that the callback can reach the
//! wheel (it gets `&mut Server`, which owns the wheel) and even cancel
//! itself: [`TimerWheel::expired`] lists due ids, [`TimerWheel::take`] lends
//! the payload out, [`TimerWheel::finish`] puts it back (re-armed for
//! intervals) or drops it if it was cancelled meanwhile.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A timer id, unique for the life of the wheel.
pub type TimerId = u64;

/// Width of one bucket: the wheel's resolution.
pub const RESOLUTION: Duration = Duration::from_millis(10);
/// Number of buckets; one turn of the wheel is `SLOTS * RESOLUTION` (5.12 s).
const SLOTS: usize = 512;

struct Entry<T> {
    due: u64,              // tick at which it fires
    interval: Option<u64>, // ticks between firings (tick) or None (after)
    payload: Option<T>,    // None while lent out to a running callback
    cancelled: bool,       // set by cancel; the wheel unlinks it
    linked: bool,          // whether an id sits in a bucket for it
}

/// A hashed timer wheel holding payloads of type `T`.
pub struct TimerWheel<T> {
    origin: Instant,          // tick 0
    now_tick: u64,            // every bucket up to here has been expired
    slots: Vec<Vec<TimerId>>, // bucket = due % SLOTS
    entries: HashMap<TimerId, Entry<T>>,
    next_id: TimerId,
    /// No bucket before this tick holds an entry (see `next_deadline`):
    /// lowered by every insert, raised by each scan, so the poll timeout
    /// costs O(1) while nothing changes instead of a walk over the wheel.
    scan_from: std::cell::Cell<u64>,
}

impl<T> std::fmt::Debug for TimerWheel<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimerWheel")
            .field("timers", &self.len())
            .field("now_tick", &self.now_tick)
            .finish()
    }
}

impl<T> Default for TimerWheel<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> TimerWheel<T> {
    /// An empty wheel whose clock starts now.
    pub fn new() -> Self {
        TimerWheel {
            origin: Instant::now(),
            now_tick: 0,
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            entries: HashMap::new(),
            next_id: 1,
            scan_from: std::cell::Cell::new(0),
        }
    }

    fn tick_of(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.origin).as_nanos() / RESOLUTION.as_nanos()) as u64
    }

    /// Duration in ticks, rounded up, at least one.
    fn ticks(d: Duration) -> u64 {
        (d.as_nanos().div_ceil(RESOLUTION.as_nanos()) as u64).max(1)
    }

    /// Number of live (not cancelled) timers. O(n).
    pub fn len(&self) -> usize {
        self.entries.values().filter(|e| !e.cancelled).count()
    }

    /// Whether no live timer exists. O(n).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Arms a timer firing `delay` after `now`, then every `interval` if
    /// given. Returns its id. O(1).
    pub fn insert(
        &mut self,
        now: Instant,
        delay: Duration,
        interval: Option<Duration>,
        payload: T,
    ) -> TimerId {
        let id = self.next_id;
        self.next_id += 1;
        let due = self.tick_of(now).max(self.now_tick) + Self::ticks(delay);
        self.slots[(due % SLOTS as u64) as usize].push(id);
        self.scan_from.set(self.scan_from.get().min(due));
        self.entries.insert(
            id,
            Entry {
                due,
                interval: interval.map(Self::ticks),
                payload: Some(payload),
                cancelled: false,
                linked: true,
            },
        );
        id
    }

    /// Cancels a timer; returns false if it does not exist or was already
    /// cancelled. Safe from inside the timer's own callback. O(1).
    pub fn cancel(&mut self, id: TimerId) -> bool {
        match self.entries.get_mut(&id) {
            Some(e) if !e.cancelled => {
                e.cancelled = true;
                // Not lent out: drop it now (a bucket still naming the id
                // skips it). Lent out: `finish` drops it.
                if e.payload.is_some() {
                    self.entries.remove(&id);
                }
                true
            }
            _ => false,
        }
    }

    /// Whether `id` is armed (or running) and not cancelled.
    pub fn contains(&self, id: TimerId) -> bool {
        self.entries.get(&id).is_some_and(|e| !e.cancelled)
    }

    /// Advances the wheel to `now` and returns the ids due, in due order
    /// within each bucket. Cancelled entries met on the way are unlinked.
    /// O(buckets passed + entries in them), at most one full turn.
    pub fn expired(&mut self, now: Instant) -> Vec<TimerId> {
        let target = self.tick_of(now);
        let mut due = Vec::new();
        if target <= self.now_tick {
            return due;
        }
        // Past one full turn every bucket gets visited once: cap the walk.
        let start = (self.now_tick + 1).max(target.saturating_sub(SLOTS as u64 - 1));
        let last = target;
        for tick in start..=last {
            let slot = (tick % SLOTS as u64) as usize;
            let ids = std::mem::take(&mut self.slots[slot]);
            let mut keep = Vec::new();
            for id in ids {
                let Some(e) = self.entries.get_mut(&id) else {
                    continue;
                };
                if e.cancelled {
                    self.entries.remove(&id);
                } else if e.due <= target {
                    e.linked = false;
                    due.push(id);
                } else {
                    keep.push(id);
                }
            }
            self.slots[slot] = keep;
        }
        self.now_tick = target;
        self.shrink();
        due
    }

    /// Gives memory back once the table is mostly empty, e.g. after a
    /// connection storm whose handshake timers are all gone (idle
    /// connections must not pay for the storm's peak). Amortised O(1).
    fn shrink(&mut self) {
        let cap = self.entries.capacity();
        if cap > 256 && self.entries.len() * 8 < cap {
            self.entries.shrink_to(self.entries.len() * 2);
        }
    }

    /// Lends out the payload of a due timer to run it. `None` if it was
    /// cancelled (and is then dropped) or is unknown.
    pub fn take(&mut self, id: TimerId) -> Option<T> {
        let e = self.entries.get_mut(&id)?;
        if e.cancelled {
            self.entries.remove(&id);
            return None;
        }
        e.payload.take()
    }

    /// Returns a payload after its callback ran: an interval timer is
    /// re-armed from `now`, a one-shot or cancelled one is dropped. O(1).
    pub fn finish(&mut self, id: TimerId, now: Instant, payload: T) {
        let base = self.tick_of(now).max(self.now_tick);
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        match (e.cancelled, e.interval) {
            (false, Some(every)) => {
                e.due = base + every;
                e.payload = Some(payload);
                e.linked = true;
                self.slots[(e.due % SLOTS as u64) as usize].push(id);
                self.scan_from.set(self.scan_from.get().min(e.due));
            }
            _ => {
                self.entries.remove(&id);
            }
        }
    }

    /// When the next bucket holding any entry comes due, for the poll
    /// timeout (may be early: the entry can be a later turn's or
    /// cancelled). `None` when the wheel is empty. O(1) when the answer
    /// has not changed since the last call, O(SLOTS) at worst. Never late:
    /// every entry due before `scan_from` lowered it when it was linked.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.entries.is_empty() {
            return None;
        }
        let base = self.now_tick + 1;
        let start = self.scan_from.get().max(base);
        let found = (start..base + SLOTS as u64)
            .find(|t| !self.slots[(t % SLOTS as u64) as usize].is_empty())?;
        self.scan_from.set(found);
        Some(self.origin + RESOLUTION * found as u32)
    }
}

/// A connection's one timer id, in 8 bytes rather than the 16 of an
/// `Option<u64>` (ids start at 1, so 0 is free to mean none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnTimer(Option<std::num::NonZeroU64>);

impl ConnTimer {
    /// Arms it with `id` (replacing any).
    pub fn set(&mut self, id: TimerId) {
        self.0 = std::num::NonZeroU64::new(id);
    }
    /// Takes the id out, leaving none.
    pub fn take(&mut self) -> Option<TimerId> {
        self.0.take().map(|t| t.get())
    }
    /// Whether one is armed.
    pub fn is_some(&self) -> bool {
        self.0.is_some()
    }
    /// Whether none is armed.
    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }
}

impl PartialEq<Option<TimerId>> for ConnTimer {
    fn eq(&self, other: &Option<TimerId>) -> bool {
        self.0.map(|t| t.get()) == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn next_deadline_follows_inserts_and_expiry() {
        let mut w = TimerWheel::new();
        let t0 = w.origin;
        w.insert(t0, ms(3000), None, "far");
        let far = w.next_deadline().unwrap();
        assert!(
            far >= t0 + ms(3000) - ms(2 * SLOTS as u64 * 10),
            "{:?}",
            far - t0
        );
        w.insert(t0, ms(50), None, "near");
        let near = w.next_deadline().unwrap();
        assert!(
            near <= t0 + ms(60) && near >= t0 + ms(50),
            "a nearer insert lowers the deadline: {:?}",
            near - t0
        );
        assert_eq!(w.expired(t0 + ms(60)).len(), 1);
        assert!(w.next_deadline().unwrap() > t0 + ms(60), "then the far one");
    }

    #[test]
    fn after_fires_once_on_time() {
        let mut w = TimerWheel::new();
        let t0 = Instant::now();
        let id = w.insert(t0, ms(50), None, "a");
        assert!(w.expired(t0 + ms(30)).is_empty());
        let due = w.expired(t0 + ms(70));
        assert_eq!(due, vec![id]);
        let p = w.take(id).unwrap();
        w.finish(id, t0 + ms(70), p);
        assert!(!w.contains(id));
        assert!(w.expired(t0 + ms(500)).is_empty());
        assert!(w.next_deadline().is_none());
    }

    #[test]
    fn tick_rearms_and_cancel_from_inside_stops_it() {
        let mut w = TimerWheel::new();
        let t0 = Instant::now();
        let id = w.insert(t0, ms(20), Some(ms(20)), 0u32);
        let mut fired = 0;
        let mut now = t0;
        for _ in 0..20 {
            now += ms(20);
            for d in w.expired(now) {
                let Some(p) = w.take(d) else { continue };
                fired += 1;
                if fired == 3 {
                    assert!(w.cancel(d), "a callback may cancel itself");
                }
                w.finish(d, now, p);
            }
        }
        assert_eq!(fired, 3);
        assert!(!w.contains(id));
        assert!(!w.cancel(id), "ids are not reusable after cancel");
    }

    #[test]
    fn cancel_marks_and_wheel_unlinks() {
        let mut w = TimerWheel::new();
        let t0 = Instant::now();
        let ids: Vec<_> = (0..5000)
            .map(|i| w.insert(t0, ms(10 + i % 3000), None, i))
            .collect();
        for id in ids.iter().step_by(2) {
            assert!(w.cancel(*id));
        }
        assert_eq!(w.len(), 2500);
        let mut got = 0;
        let mut now = t0;
        while now < t0 + ms(3100) {
            now += ms(10);
            for d in w.expired(now) {
                assert!(d % 2 == 0, "cancelled ids never fire"); // ids start at 1: odd ids were cancelled
                let p = w.take(d).unwrap();
                w.finish(d, now, p);
                got += 1;
            }
        }
        assert_eq!(got, 2500);
        assert!(w.entries.is_empty(), "cancelled entries were unlinked");
    }

    #[test]
    fn far_timers_survive_turns_and_long_sleeps() {
        let mut w = TimerWheel::new();
        let t0 = Instant::now();
        let far = w.insert(t0, ms(12_000), None, ());
        let near = w.insert(t0, ms(100), None, ());
        assert!(w.next_deadline().unwrap() <= t0 + ms(120));
        assert_eq!(w.expired(t0 + ms(6000)), vec![near]);
        w.take(near);
        assert!(w.expired(t0 + ms(11_000)).is_empty());
        assert_eq!(w.expired(t0 + ms(20_000)), vec![far]);
    }

    #[test]
    fn ids_never_reused() {
        let mut w = TimerWheel::new();
        let t0 = Instant::now();
        let a = w.insert(t0, ms(1), None, ());
        w.cancel(a);
        let b = w.insert(t0, ms(1), None, ());
        assert_ne!(a, b);
    }
}
