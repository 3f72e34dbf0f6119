//! The Outpost hub: the fleet's control point, and the operator's tools around it.
//!
//! - [`cli`]: one module per command group, each an `Args` struct with `run()`.
//! - [`keyfile`]: release-key files on the operator's machine. Private keys never leave it.
//! - [`fsutil`]: crash-safe file writes.

pub mod cli;
pub mod fsutil;
pub mod keyfile;

/// Unix seconds now, by this machine's clock.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}
