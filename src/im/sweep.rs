//! A paced round over a worker's keys (its connections, its groups): the
//! checks due now (after a `check` or a disruption), a few hundred per
//! tick, and a background sweep that visits every key once per period,
//! spread evenly over the ticks whatever the number of keys (a worker
//! with 3 connections checks each once per period too, not every tick).

use std::collections::VecDeque;

/// Keys taken from the urgent queue per tick at most.
pub const URGENT_PER_TICK: usize = 200;

/// The keys waiting for a check.
#[derive(Debug)]
pub struct Sweep<K> {
    /// Due now, in order.
    urgent: VecDeque<K>,
    /// The background sweep's round, in order.
    round: VecDeque<K>,
    /// Milliseconds for one round over every key (0: no sweep).
    period_ms: u64,
    /// Milliseconds between two calls of [`Sweep::due`].
    tick_ms: u64,
    /// Work owed to the sweep, in key-milliseconds (below `period_ms`).
    credit: u64,
}

impl<K> Sweep<K> {
    /// A sweep over every key once per `period_secs` (0: none), asked
    /// every `tick_ms`.
    pub fn new(period_secs: f64, tick_ms: u64) -> Sweep<K> {
        Sweep {
            urgent: VecDeque::new(),
            round: VecDeque::new(),
            period_ms: (period_secs.max(0.0) * 1000.0) as u64,
            tick_ms,
            credit: 0,
        }
    }

    /// Every key in `keys` is due now.
    pub fn all(&mut self, keys: impl IntoIterator<Item = K>) {
        self.urgent = keys.into_iter().collect();
    }

    /// The keys to check this tick: up to [`URGENT_PER_TICK`] urgent ones,
    /// then the sweep's share of the `n` keys there are now (`keys` lists
    /// them when a round starts; a key gone since is the caller's to skip).
    pub fn due<I: IntoIterator<Item = K>>(
        &mut self,
        n: usize,
        mut keys: impl FnMut() -> I,
    ) -> Vec<K> {
        let take = self.urgent.len().min(URGENT_PER_TICK);
        let mut out: Vec<K> = self.urgent.drain(..take).collect();
        if self.period_ms == 0 || n == 0 {
            self.credit = 0;
            return out;
        }
        self.credit += n as u64 * self.tick_ms;
        let share = self.credit / self.period_ms;
        self.credit %= self.period_ms;
        for _ in 0..share {
            if self.round.is_empty() {
                self.round = keys().into_iter().collect();
            }
            match self.round.pop_front() {
                Some(k) => out.push(k),
                None => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_is_swept_once_per_period_however_few_there_are() {
        let mut s: Sweep<u32> = Sweep::new(1.0, 100);
        let got: Vec<u32> = (0..30).flat_map(|_| s.due(3, || [1, 2, 3])).collect();
        assert_eq!(got, [1, 2, 3, 1, 2, 3, 1, 2, 3], "3 s: three rounds");
        let mut many: Sweep<u32> = Sweep::new(1.0, 100);
        let n = many.due(25, || 0..25).len() + many.due(25, || 0..25).len();
        assert_eq!(n, 5, "25 keys in 10 ticks: 2.5 per tick");
    }

    #[test]
    fn urgent_keys_go_first_a_bounded_number_per_tick() {
        let mut s: Sweep<usize> = Sweep::new(0.0, 100);
        s.all(0..URGENT_PER_TICK + 5);
        assert_eq!(s.due(1, Vec::new).len(), URGENT_PER_TICK);
        assert_eq!(
            s.due(1, Vec::new),
            (URGENT_PER_TICK..URGENT_PER_TICK + 5).collect::<Vec<_>>()
        );
        assert!(s.due(1, Vec::new).is_empty(), "no sweep with period 0");
    }
}
