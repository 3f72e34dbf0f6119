//! The model's own code, which the agent and the hub both stand on.
//!
//! - [`inference`]: loading, running and validating an ONNX model with tract — the one inference
//!   path, shared by the agent's probation and local API and the hub's publish gate.
//! - [`drift`]: reading a drift profile's features out of requests and answers, and building a
//!   profile from reference data with the same reader (for `outpost-hub profile`).
//! - [`samples`]: how a tensor holds samples (a batch axis first, a fixed batch of 1, or none),
//!   for everything that reads inputs and outputs one sample at a time.
//! - [`example`]: small deterministic ONNX models built in Rust, for tests, the quickstart and
//!   benchmarks.
//! - [`fsutil`]: crash-safe file writes; here because this is the one crate both binaries stand
//!   on that may touch the disk (`protocol` does no I/O).

pub mod drift;
pub mod example;
pub mod fsutil;
pub mod inference;
pub mod samples;
