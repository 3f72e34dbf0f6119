//! The language agent and hub speak, and the rules that decide what a device may run.
//!
//! This crate is pure: it does no I/O, reads no clock and knows nothing of sled, tract, ureq or
//! tokio. Callers pass in bytes and times; the crate answers with typed values or typed errors.
//!
//! - [`envelope`]: the framing every device↔hub message travels in, with a size cap per type.
//! - [`trust`]: the TUF-shaped chain of trust — roots, model manifests, rollout plans — and the
//!   only constructors of `Verified…` values.
//! - [`device`]: the device API's request and response bodies.
//! - [`auth`]: what a device signs to authenticate a request.
//! - [`capture`]: data capture's device messages, and sealing samples to the operator's key.
//! - [`drift`]: drift profiles and summaries, their merging and checks, and the drift metrics.
//! - [`name`], [`keys`]: validated newtypes shared by all of the above.
//! - [`dataset`]: CSV and `.npy` reference datasets for drift profiles, parsed from bytes.

pub mod auth;
pub mod capture;
pub mod dataset;
pub mod device;
pub mod drift;
pub mod envelope;
pub mod keys;
mod latency;
pub mod name;
pub mod trust;

pub use envelope::{
    decode, encode, encoded_len, DecodeError, DecodeReason, EncodeError, Message, MessageKind,
};
pub use keys::{sha256, verify_batch, BatchItem, KeyId, PreparedKey, PublicKey, SecretKey, Sha256};
pub use name::{Label, ModelName, NameError};
pub use trust::{
    AgentVersion, Arch, TimeFloor, VerifiedManifest, VerifiedPlan, VerifiedRoot, VerifyError,
};
