//! The Outpost agent: what runs on every device.
//!
//! - [`cli`]: the agent's commands.
//! - [`check`]: the device's one, pure decision on signed documents: the sync loop acts on its
//!   verdict, and `outpost-agent verify` asks it offline "would this device accept these files?".
//! - [`sync`]: the cycle with the hub, a module per job (acting on the verdict, activation,
//!   shadowing, the report outbox, telemetry upload).
//! - The model's own code (inference, drift features, example models, crash-safe writes) lives in
//!   `outpost-model`, which the hub stands on too.
//! - [`api`]: the local inference API (Open Inference Protocol / KServe v2 REST) over the active
//!   model, with hot swap that never fails an in-flight request, and `/metrics`.
//! - [`shadow`]: the target of a plan's shadow stage, run beside the active model on copies of
//!   live inputs off the request path, its answers compared with the active model's.
//! - [`capture`]: which served requests are captured under a signed capture allowance (rate, day
//!   caps, trigger, dropped tensors), decided on the request path and sealed off it.
//! - [`runtime`]: which inference runtime serves the models (tract, or ONNX Runtime once a child
//!   process has proven the device's library loads).
//! - [`cache`]: the telemetry cache — closed inference windows on disk (sled) until the hub
//!   acknowledges them, under a byte cap, with crash-safe upload batches; its records, index and
//!   roll-up in submodules of their own.

pub mod api;
pub mod cache;
pub mod capture;
pub mod check;
pub mod cli;
pub mod config;
pub mod download;
pub mod hub_client;
pub mod notify;
pub mod runtime;
pub mod service;
pub mod shadow;
pub mod slot;
pub mod state;
pub mod sync;
pub mod telemetry;
pub mod versions;

/// This agent's version, as compared against a manifest's `min_agent_version`.
pub fn agent_version() -> outpost_protocol::AgentVersion {
    outpost_protocol::AgentVersion {
        major: env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap_or(0),
        minor: env!("CARGO_PKG_VERSION_MINOR").parse().unwrap_or(0),
        patch: env!("CARGO_PKG_VERSION_PATCH").parse().unwrap_or(0),
    }
}

/// Unix seconds now, by the device's clock.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}
