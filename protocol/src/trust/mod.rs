//! The chain of trust: what a device may run, and who may say so.
//!
//! Three kinds of signed document, each a [`Signed`] wrapper around a framed body:
//! - a **root** ([`RootBody`]) lists the release keys and the signature threshold;
//! - a **manifest** ([`ManifestBody`]) names one model version and the hashes of its artifacts;
//! - a **plan** ([`PlanBody`]) says which manifest a fleet rolls out and which it falls back to;
//! - a **capture allowance** ([`CaptureBody`]) lets devices keep sealed samples of a model's
//!   requests, at a signed rate and under signed caps (`capture.rs`).
//!
//! Verification follows TUF: signatures are checked over the exact payload bytes before the payload
//! is decoded (a rotated root is first checked against the *old* keys), distinct key ids are counted
//! against the threshold, then expiry is checked against a [`TimeFloor`], then rollback. Only the
//! functions here build the `Verified…` types, so holding one is proof that all of this happened.
//!
//! The hub is an untrusted mirror. It may choose *when* a device moves between the target and the
//! fallback of a valid plan, and nothing else: it cannot forge a document, replay an older plan,
//! serve a lower manifest version than the device has seen (except a plan's signed fallback), or
//! pass off one manifest's artifact as another's.

mod capture;
mod documents;
mod error;
mod manifest;
mod plan;
mod retire;
mod root;
mod time;

pub use capture::{
    capture_model_unverified, CaptureBody, CaptureTrigger, CaptureVersions, VerifiedCapture,
    CAPTURE_RATE_ALL, MAX_CAPTURE_BYTES_PER_DAY, MAX_CAPTURE_LIST, MAX_CAPTURE_NAME,
    MAX_CAPTURE_SAMPLES_PER_DAY, MAX_CAPTURE_SAMPLE_BYTES,
};
pub use documents::{
    AgentVersion, Arch, Artifact, ArtifactRole, BreachAction, DType, Dim, GatePolicy, KeySignature,
    ManifestBody, ManifestRef, PlanBody, Role, RootBody, ShadowStage, Signed, SignedBody, Slot,
    TensorSpec, MAX_ROOT_KEYS, SIGNING_CONTEXT,
};
pub use error::VerifyError;
pub use manifest::VerifiedManifest;
pub use plan::VerifiedPlan;
pub use retire::{is_retirement, RetireBody, VerifiedRetire};
pub use root::VerifiedRoot;
pub use time::TimeFloor;

/// Declares a type a framed [`crate::Message`] of the given kind, name and frame cap.
macro_rules! message {
    ($ty:ty, $kind:ident, $name:literal, $max:expr) => {
        impl Message for $ty {
            const KIND: MessageKind = MessageKind::$kind;
            const NAME: &'static str = $name;
            const MAX_FRAME: usize = $max;
        }
    };
}
pub(crate) use message;
