//! Measuring, shared by the timed modes: the measured [`Window`] after a
//! warm-up (with the `MEASURE_START` / `MEASURE_END` lines a script samples
//! the server's CPU time at), latency samples in microseconds, their
//! percentiles, and joining the per-connection tasks.

use std::io::Write;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};

use crate::connect::ErrorLog;

/// `warmup` seconds from now, then `duration` measured seconds.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// When measuring starts (the warm-up's end).
    pub start: Instant,
    /// When the run ends.
    pub end: Instant,
}

impl Window {
    /// The window after `warmup` seconds from now, `duration` seconds long.
    pub fn after(warmup: f64, duration: f64) -> Window {
        let start = Instant::now() + Duration::from_secs_f64(warmup);
        Window {
            start,
            end: start + Duration::from_secs_f64(duration),
        }
    }

    /// Prints `MEASURE_START` and `MEASURE_END` at the window's edges.
    pub fn spawn_markers(&self) -> JoinHandle<()> {
        let w = *self;
        tokio::spawn(async move {
            sleep_until(w.start).await;
            say("MEASURE_START");
            sleep_until(w.end).await;
            say("MEASURE_END");
        })
    }

    /// Whether something that started at `from` and finished at `to` lies
    /// inside the window.
    pub fn holds(&self, from: Instant, to: Instant) -> bool {
        from >= self.start && to <= self.end
    }

    /// Whether `t` lies inside the window.
    pub fn covers(&self, t: Instant) -> bool {
        self.holds(t, t)
    }
}

/// A latency in whole microseconds (saturating).
pub fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Waits for every task and concatenates what they return; a task that
/// panicked is counted in `errors`.
pub async fn join_samples(tasks: Vec<JoinHandle<Vec<u32>>>, errors: &ErrorLog) -> Vec<u32> {
    let mut samples = Vec::new();
    for t in tasks {
        match t.await {
            Ok(s) => samples.extend(s),
            Err(e) => errors.record(format!("task: {e}")),
        }
    }
    samples.sort_unstable();
    samples
}

/// The `p`th percentile of sorted samples (nearest rank), 0 if empty.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    // The epsilon keeps float noise (0.999 * 1000 = 999.0000000001) from
    // bumping the rank.
    let rank = ((p / 100.0) * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The largest of sorted samples, 0 if empty.
pub fn max(sorted: &[u32]) -> u32 {
    sorted.last().copied().unwrap_or(0)
}

/// Prints a marker line for scripts and flushes it at once.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&v, 50.0), 500);
        assert_eq!(percentile(&v, 99.0), 990);
        assert_eq!(percentile(&v, 99.9), 999);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!((max(&v), max(&[])), (1000, 0));
    }

    #[test]
    fn micros_saturate() {
        assert_eq!(micros(Duration::from_millis(3)), 3000);
        assert_eq!(micros(Duration::from_secs(1 << 40)), u32::MAX);
    }
}
