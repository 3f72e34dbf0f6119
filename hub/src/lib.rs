//! The Outpost hub: the fleet's control point, and the operator's tools around it.
//!
//! - [`cli`]: one module per command group, each an `Args` struct with `run()`.
//! - [`keyfile`]: release-key files on the operator's machine. Private keys never leave it.
//! - [`rollout`]: the rollout engine, pure logic: stages, health gates and decisions.
//! - [`client`]: the CLI's HTTP client of a hub's admin API.
//! - [`alerts`]: alert rules, their states and webhook payloads, pure logic.

pub mod alerts;
pub mod api;
pub mod artifacts;
pub mod audit;
pub mod cli;
pub mod client;
pub mod keyfile;
pub mod rollout;
pub mod server;
pub mod store;

/// Unix seconds now, by this machine's clock.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}
