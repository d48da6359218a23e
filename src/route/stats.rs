//! The Route's own counters (per worker), exported by `/metrics`.

/// Counters of one Route worker.
#[derive(Debug, Default, Clone)]
pub struct RouteStats {
    /// Registrations stored.
    pub registrations: u64,
    /// Entries re-registered after Redis lost them.
    pub rebuilt: u64,
    /// Frames refused.
    pub protocol_errors: u64,
    /// Registrations refused for a bad token.
    pub auth_failures: u64,
    /// Removals whose peer closed.
    pub removed_closed: u64,
    /// Removals of silent peers.
    pub removed_silent: u64,
    /// Removals by lease expiry.
    pub removed_lease: u64,
    /// Removals because the same connection re-registered elsewhere.
    pub removed_replaced: u64,
}

impl RouteStats {
    /// Counts a removal by cause.
    pub fn removed(&mut self, cause: &str) {
        match cause {
            "closed" => self.removed_closed += 1,
            "silent" => self.removed_silent += 1,
            "lease" => self.removed_lease += 1,
            _ => self.removed_replaced += 1,
        }
    }
}
