//! The manager's policy for replacing workers: a worker that asked to be
//! replaced (`max_request`), stopping the tree, the deadlines that
//! escalate a stop to SIGKILL, and rolling reloads (start each
//! replacement, wait until it serves, then retire its predecessor). The
//! mechanism (forking, reaping, the loop) is in [`super`].

use super::*;

impl<A: App> Manager<'_, A> {
    /// A worker reached `max_request` and asks to be replaced: its
    /// replacement is spawned like a reload's, and it hands over once the
    /// replacement serves.
    pub(super) fn replace_worker(&mut self, pid: Pid) {
        if self.stopping.is_some() {
            return;
        }
        let Some(c) = self
            .table
            .iter()
            .find(|c| c.pid == pid && c.stopping_since.is_none())
        else {
            return;
        };
        let slot = c.slot;
        log::info!(
            "{} (pid {pid}) reached max_request; replacing it",
            slot.label()
        );
        self.args
            .scoreboard
            .totals()
            .worker_replacements
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !self.reload_queue.contains(&slot) {
            self.reload_queue.push_back(slot);
        }
    }

    pub(super) fn begin_stop(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        log::info!("stopping {} workers", self.table.len());
        self.stopping = Some(Instant::now());
        self.reload_queue.clear();
        for c in &mut self.table {
            c.stopping_since.get_or_insert_with(Instant::now);
        }
        self.signal_all(Signal::SIGTERM);
    }

    pub(super) fn signal_all(&self, sig: Signal) {
        for c in &self.table {
            let _ = kill(c.pid, sig);
        }
    }

    /// SIGKILLs workers that overran `max_wait_time`, respawns slots whose
    /// backoff elapsed.
    pub(super) fn deadlines(&mut self) {
        let grace = Duration::from_secs_f64(self.args.settings.max_wait_time);
        for c in &self.table {
            if c.stopping_since.is_some_and(|t| t.elapsed() > grace) {
                log::warn!(
                    "{} (pid {}) did not stop within {:.1}s; killing it",
                    c.slot.label(),
                    c.pid,
                    grace.as_secs_f64()
                );
                let _ = kill(c.pid, Signal::SIGKILL);
            }
        }
        if self.stopping.is_some() {
            return;
        }
        let now = Instant::now();
        let ws = self.args.settings.worker_num;
        for idx in 0..self.policy.len() {
            if self.policy[idx].respawn_at.is_some_and(|t| t <= now) {
                self.policy[idx].respawn_at = None;
                let slot = if idx < ws {
                    Slot::Worker(idx)
                } else {
                    Slot::Task(idx - ws)
                };
                if let Err(e) = self.spawn(slot, None) {
                    log::error!("respawning {}: {e}; retrying", slot.label());
                    self.policy[idx].respawn_at = Some(now + BACKOFF_MAX);
                }
            }
        }
    }

    pub(super) fn queue_reload(&mut self, workers: bool) {
        if self.stopping.is_some() {
            return;
        }
        let slots: Vec<Slot> = if workers {
            (0..self.args.settings.worker_num)
                .map(Slot::Worker)
                .collect()
        } else {
            (0..self.args.settings.task_worker_num)
                .map(Slot::Task)
                .collect()
        };
        log::info!(
            "reloading {} {}",
            slots.len(),
            if workers { "workers" } else { "task workers" }
        );
        self.args
            .scoreboard
            .totals()
            .reloads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.reload_unreported |= workers;
        for s in slots {
            if !self.reload_queue.contains(&s) {
                self.reload_queue.push_back(s);
            }
        }
    }

    /// Starts the next replacement when the previous one serves
    /// (`reload_async`), or all at once otherwise. Reports `RELOADED` to
    /// the master once the queue drained and every replacement serves.
    pub(super) fn advance_reload(&mut self) {
        loop {
            let in_flight = self.table.iter().any(|c| c.replaces.is_some() && !c.ready);
            let Some(&slot) = self.reload_queue.front() else {
                if self.reload_unreported && !in_flight {
                    self.reload_unreported = false;
                    log::info!("reload finished: every replacement serves");
                    self.report("RELOADED");
                }
                return;
            };
            if in_flight && self.args.settings.reload_async {
                return;
            }
            // One handover per slot at a time: a slot whose predecessor is
            // still leaving waits (both would read the slot's handover socket).
            if self
                .table
                .iter()
                .any(|c| c.slot == slot && c.stopping_since.is_some())
            {
                return;
            }
            self.reload_queue.pop_front();
            let Some(old) = self
                .table
                .iter()
                .find(|c| c.slot == slot && c.stopping_since.is_none())
                .map(|c| c.pid)
            else {
                continue; // the slot is being respawned anyway
            };
            if let Err(e) = self.spawn(slot, Some(old)) {
                log::error!("reload of {}: {e}; keeping pid {old}", slot.label());
            }
        }
    }
}
