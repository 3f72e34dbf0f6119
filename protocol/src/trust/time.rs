//! The time floor: the one notion of "now" that expiry is judged against.

/// The time against which expiry is judged: the latest of the device's wall clock, the newest
/// `created` time of any document it has accepted, and the hub's reported time. A device whose
/// clock was reset to 1970 still refuses documents that expired before ones it has already seen.
/// The agent keeps the newest signed time for good, but the hub's time only from the hub's latest
/// answer: signed times come from the release keys, the hub's from an untrusted clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeFloor {
    pub wall_clock: u64,
    pub newest_signed: u64,
    pub hub_time: u64,
}

impl TimeFloor {
    /// Unix seconds judged to be "now".
    pub fn now(&self) -> u64 {
        self.wall_clock.max(self.newest_signed).max(self.hub_time)
    }
}
