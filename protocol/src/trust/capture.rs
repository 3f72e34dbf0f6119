//! Capture allowances: the signed word that lets devices keep samples of what a model serves.
//!
//! A device keeps a request's inputs and outputs only while an allowance signed by a threshold
//! of the release keys (those of plans) says so, for the model and version it serves, at the
//! signed rate, under the signed caps per device and UTC day, with the signed tensors dropped and
//! sealed to the signed recipient key. The hub stores and serves allowances but cannot make one:
//! nothing it says alone turns capture on, widens it or names another recipient.
//!
//! Each model has a sequence of its own for allowances; a device keeps the highest it verified
//! and refuses a lower one, so a later allowance (one with `rate_ppm` 0 turns capture off)
//! supersedes an earlier one and a hub cannot replay the earlier one back into force.
//!
//! Every allowance is bounded by the protocol's hard maxima ([`MAX_CAPTURE_SAMPLES_PER_DAY`],
//! [`MAX_CAPTURE_BYTES_PER_DAY`], ...): one above them is refused when it is signed, when the
//! hub receives it and when a device verifies it ([`VerifyError::CaptureAboveMaximum`]).

use serde::{Deserialize, Serialize};

use super::documents::{Role, Signed, SignedBody};
use super::root::check_expiry;
use super::{message, TimeFloor, VerifiedRoot, VerifyError};
use crate::envelope::{self, MessageKind};
use crate::keys::{sha256, Sha256};
use crate::name::ModelName;
use crate::Message;

/// Most samples any allowance lets one device keep of one model in one UTC day.
pub const MAX_CAPTURE_SAMPLES_PER_DAY: u64 = 10_000;
/// Most sealed bytes any allowance lets one device keep of one model in one UTC day.
pub const MAX_CAPTURE_BYTES_PER_DAY: u64 = 64 * 1024 * 1024;
/// Largest sealed sample: a request whose sample would be larger is not captured.
pub const MAX_CAPTURE_SAMPLE_BYTES: usize = 1024 * 1024;
/// The rate is a probability per served request in parts per million: this is "every request".
pub const CAPTURE_RATE_ALL: u32 = 1_000_000;
/// Most versions an allowance may list, and most tensor names it may drop on each side.
pub const MAX_CAPTURE_LIST: usize = 64;
/// Longest tensor name an allowance may drop.
pub const MAX_CAPTURE_NAME: usize = 128;

/// Which versions of the model an allowance covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CaptureVersions {
    All,
    /// At least one, at most [`MAX_CAPTURE_LIST`].
    Only(Vec<u64>),
}

impl CaptureVersions {
    pub fn covers(&self, version: u64) -> bool {
        match self {
            CaptureVersions::All => true,
            CaptureVersions::Only(versions) => versions.contains(&version),
        }
    }
}

/// When a device captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CaptureTrigger {
    Always,
    /// Only while the device's own drift summary of the model's current (or last closed) window
    /// is flagged ALERT against the model's signed profile. Judged on the device, never from
    /// anything the hub says.
    WhileDriftAlert,
}

impl CaptureTrigger {
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureTrigger::Always => "always",
            CaptureTrigger::WhileDriftAlert => "while-drift-alert",
        }
    }
}

/// What devices running `model` may capture. Signed by the keys, and with the threshold, that
/// sign plans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureBody {
    /// Per model: a device keeps the highest it verified and refuses lower ones.
    pub sequence: u64,
    pub created: u64,
    pub expires: u64,
    pub model: String,
    pub versions: CaptureVersions,
    /// Chance that a served request is captured, in parts per million (1..=[`CAPTURE_RATE_ALL`]);
    /// 0 turns capture off.
    pub rate_ppm: u32,
    /// Samples one device keeps per UTC day, at most [`MAX_CAPTURE_SAMPLES_PER_DAY`].
    pub max_samples_per_day: u64,
    /// Sealed bytes one device keeps per UTC day, at most [`MAX_CAPTURE_BYTES_PER_DAY`].
    pub max_bytes_per_day: u64,
    pub trigger: CaptureTrigger,
    /// Input tensors left out of every sample.
    pub drop_inputs: Vec<String>,
    /// Output tensors left out of every sample.
    pub drop_outputs: Vec<String>,
    /// The operator's X25519 public key: samples are sealed to it (libsodium sealed boxes).
    pub recipient: [u8; 32],
}

message!(
    Signed<CaptureBody>,
    SignedCapture,
    "signed capture allowance",
    16 * 1024
);
message!(CaptureBody, CaptureBody, "capture allowance", 12 * 1024);

impl SignedBody for CaptureBody {
    const ROLE: Role = Role::Capture;
}

impl CaptureBody {
    /// Whether it lets anything be captured at all.
    pub fn allows_any(&self) -> bool {
        self.rate_ppm > 0 && self.max_samples_per_day > 0 && self.max_bytes_per_day > 0
    }

    /// Checks everything but signatures and time: the name, the lists and the protocol's hard
    /// maxima. The signing command and the hub call it too, so an allowance above a maximum is
    /// refused before it is ever signed or stored.
    pub fn validate(&self) -> Result<(), VerifyError> {
        if let Err(source) = ModelName::new(&self.model) {
            return Err(VerifyError::InvalidModelName {
                name: self.model.clone(),
                source,
            });
        }
        let above = |field: &'static str, value: u64, max: u64| {
            if value > max {
                Err(VerifyError::CaptureAboveMaximum { field, value, max })
            } else {
                Ok(())
            }
        };
        above(
            "rate_ppm",
            u64::from(self.rate_ppm),
            u64::from(CAPTURE_RATE_ALL),
        )?;
        above(
            "max_samples_per_day",
            self.max_samples_per_day,
            MAX_CAPTURE_SAMPLES_PER_DAY,
        )?;
        above(
            "max_bytes_per_day",
            self.max_bytes_per_day,
            MAX_CAPTURE_BYTES_PER_DAY,
        )?;
        if let CaptureVersions::Only(versions) = &self.versions {
            if versions.is_empty() {
                return Err(VerifyError::InvalidCapture(
                    "it lists no version (use all versions instead)".into(),
                ));
            }
            above("versions", versions.len() as u64, MAX_CAPTURE_LIST as u64)?;
        }
        for (field, names) in [
            ("drop_inputs", &self.drop_inputs),
            ("drop_outputs", &self.drop_outputs),
        ] {
            above(field, names.len() as u64, MAX_CAPTURE_LIST as u64)?;
            if let Some(name) = names
                .iter()
                .find(|name| name.is_empty() || name.len() > MAX_CAPTURE_NAME)
            {
                return Err(VerifyError::InvalidCapture(format!(
                    "{field} names a tensor of {} bytes (1 to {MAX_CAPTURE_NAME})",
                    name.len()
                )));
            }
        }
        if self.expires <= self.created {
            return Err(VerifyError::InvalidCapture(
                "it expires before it is created".into(),
            ));
        }
        Ok(())
    }
}

/// An allowance whose signatures, structure, maxima, freshness, model and sequence have been
/// checked.
#[derive(Debug, Clone)]
pub struct VerifiedCapture {
    body: CaptureBody,
    digest: Sha256,
    signed_bytes: Vec<u8>,
}

impl VerifiedCapture {
    pub fn body(&self) -> &CaptureBody {
        &self.body
    }

    pub fn sequence(&self) -> u64 {
        self.body.sequence
    }

    pub fn digest(&self) -> Sha256 {
        self.digest
    }

    pub fn signed_bytes(&self) -> &[u8] {
        &self.signed_bytes
    }
}

/// The model a signed allowance names, read without checking anything: only to choose which
/// model's floor to verify it against. Never a reason to trust it.
pub fn capture_model_unverified(bytes: &[u8]) -> Option<String> {
    let signed: Signed<CaptureBody> = envelope::decode(bytes).ok()?;
    signed.decode_unverified().ok().map(|body| body.model)
}

impl VerifiedRoot {
    /// Verifies a signed capture allowance: signatures (those of plans), structure and the
    /// protocol's maxima, expiry, that it is about `model` when one is expected, and that its
    /// sequence is not below `highest_seen`, the highest allowance of its model the device
    /// verified.
    pub fn verify_capture(
        &self,
        bytes: &[u8],
        floor: &TimeFloor,
        model: Option<&str>,
        highest_seen: Option<u64>,
    ) -> Result<VerifiedCapture, VerifyError> {
        let signed: Signed<CaptureBody> = envelope::decode(bytes)?;
        self.check_signed(Role::Capture, &signed.payload, &signed.signatures)?;
        let body: CaptureBody = envelope::decode(&signed.payload)?;
        body.validate()?;
        self.check_fresh(floor)?;
        check_expiry(Role::Capture, body.expires, floor)?;
        if let Some(expected) = model.filter(|expected| *expected != body.model) {
            return Err(VerifyError::CaptureWrongModel {
                expected: expected.to_owned(),
                found: body.model,
            });
        }
        if let Some(highest) = highest_seen.filter(|highest| body.sequence < *highest) {
            return Err(VerifyError::CaptureRollback {
                model: body.model,
                offered: body.sequence,
                highest,
            });
        }
        Ok(VerifiedCapture {
            digest: sha256(bytes),
            body,
            signed_bytes: bytes.to_vec(),
        })
    }
}
