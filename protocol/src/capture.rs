//! Data capture between device and hub: asking for allowances, the captured sample and its
//! sealing, and the upload of sealed samples.
//!
//! A sample is a [`CaptureSample`] frame sealed to the operator's X25519 key with a libsodium
//! sealed box (X25519 + XSalsa20-Poly1305, `crypto_box_seal`), so PyNaCl's `SealedBox` or
//! libsodium open it as well as `outpost-hub capture open`. The hub stores sealed bytes it cannot
//! read; what it sees in clear is only which model version a sample is of, the allowance it was
//! taken under and when ([`SealedSample`]).
//!
//! This module does no I/O: sealing takes the 32 random bytes of its one-time key from the
//! caller, who reads them from the operating system.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::device::Tensor;
use crate::envelope::MessageKind;
use crate::trust::{message, MAX_CAPTURE_SAMPLE_BYTES};
use crate::Message;

/// Bytes a sealed box adds to its plaintext: the one-time public key and the Poly1305 tag.
pub const SEAL_OVERHEAD: usize = 48;
/// Most samples in one upload.
pub const MAX_CAPTURE_BATCH: usize = 64;
/// Most sealed bytes in one upload: a batch stops before it would pass this.
pub const MAX_CAPTURE_BATCH_BYTES: usize = 4 * MAX_CAPTURE_SAMPLE_BYTES;

/// The device asks for the allowance of each model it runs (`/device/v3/capture`), at most
/// [`crate::device::MAX_DEVICE_MODELS`] names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureRequest {
    pub models: Vec<String>,
}

/// The hub's answer: the latest signed allowance it holds of each model asked about, as signed.
/// The device verifies each against its own root; an answer without one changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureAllowances {
    pub allowances: Vec<ByteBuf>,
}

/// What a device keeps of one served request, before sealing: the model version, when, the
/// allowance it was taken under, and the request's tensors less those the allowance drops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureSample {
    pub model: String,
    pub version: u64,
    /// The allowance's sequence.
    pub allowance: u64,
    /// Device time, Unix seconds.
    pub captured_at: u64,
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<Tensor>,
}

/// One sealed sample as it travels and as the hub stores it. The fields beside `sealed` are what
/// the hub needs to index and prune it; the tensors are only in `sealed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSample {
    /// Random, chosen by the device: a sample sent again after a lost acknowledgement is stored
    /// once.
    pub id: [u8; 16],
    pub model: String,
    pub version: u64,
    pub allowance: u64,
    pub captured_at: u64,
    /// A sealed box of a [`CaptureSample`] frame, at most [`MAX_CAPTURE_SAMPLE_BYTES`].
    #[serde(with = "serde_bytes")]
    pub sealed: Vec<u8>,
}

/// A batch of sealed samples (`/device/v3/captures`): at most [`MAX_CAPTURE_BATCH`] samples of at
/// most [`MAX_CAPTURE_BATCH_BYTES`] sealed bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureUpload {
    pub samples: Vec<SealedSample>,
    /// Samples the device dropped (its queue or cache full) since its previous upload.
    pub dropped: u64,
}

/// The hub stored every sample of the upload (or had them already).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureAck {
    pub stored: u32,
}

message!(CaptureRequest, CaptureRequest, "capture request", 4 * 1024);
message!(
    CaptureAllowances,
    CaptureAllowances,
    "capture allowances",
    17 * 16 * 1024
);
message!(
    CaptureSample,
    CaptureSample,
    "capture sample",
    MAX_CAPTURE_SAMPLE_BYTES - SEAL_OVERHEAD
);
message!(
    CaptureUpload,
    CaptureUpload,
    "capture upload",
    MAX_CAPTURE_BATCH_BYTES + MAX_CAPTURE_BATCH * 256 + 64
);
message!(CaptureAck, CaptureAck, "capture ack", 64);

/// Why a sample could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the recipient key is not a usable X25519 public key")]
    BadRecipient,
    #[error("the sample cannot be opened with this key: it was sealed to another key, or altered")]
    WrongKeyOrTampered,
    #[error("a sealed sample of {len} bytes is shorter than the {SEAL_OVERHEAD} bytes of a seal")]
    TooShort { len: usize },
}

/// The X25519 public key of `secret`: what an operator puts in an allowance.
pub fn recipient_of(secret: &[u8; 32]) -> [u8; 32] {
    *crypto_box::SecretKey::from(*secret).public_key().as_bytes()
}

/// Seals `plaintext` to `recipient` as libsodium's `crypto_box_seal` does, with `ephemeral` (32
/// bytes the caller read from the operating system's random source) as the one-time secret key.
/// Each call must get fresh bytes: they are the only secret of the seal.
pub fn seal(
    recipient: &[u8; 32],
    ephemeral: [u8; 32],
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    let recipient = crypto_box::PublicKey::from(*recipient);
    let mut one_time = OneTimeKey {
        bytes: ephemeral,
        taken: 0,
    };
    recipient
        .seal(&mut one_time, plaintext)
        .map_err(|_| SealError::BadRecipient)
}

/// Opens a sealed box with the recipient's secret key.
pub fn open(secret: &[u8; 32], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(SealError::TooShort { len: sealed.len() });
    }
    crypto_box::SecretKey::from(*secret)
        .unseal(sealed)
        .map_err(|_| SealError::WrongKeyOrTampered)
}

/// Hands `crypto_box`'s sealing the caller's random bytes as its one-time key. Sealing draws
/// exactly the 32 bytes of one X25519 secret key; past them it would get the same bytes again,
/// which [`seal`] never asks for.
struct OneTimeKey {
    bytes: [u8; 32],
    taken: usize,
}

impl crypto_box::aead::rand_core::RngCore for OneTimeKey {
    fn next_u32(&mut self) -> u32 {
        let mut out = [0u8; 4];
        self.fill_bytes(&mut out);
        u32::from_le_bytes(out)
    }

    fn next_u64(&mut self) -> u64 {
        let mut out = [0u8; 8];
        self.fill_bytes(&mut out);
        u64::from_le_bytes(out)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for byte in dest {
            *byte = self.bytes[self.taken % self.bytes.len()];
            self.taken += 1;
        }
    }

    fn try_fill_bytes(
        &mut self,
        dest: &mut [u8],
    ) -> Result<(), crypto_box::aead::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl crypto_box::aead::rand_core::CryptoRng for OneTimeKey {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_sealed_sample_opens_with_its_key_only() {
        let secret = [7u8; 32];
        let recipient = recipient_of(&secret);
        let sealed = seal(&recipient, [9u8; 32], b"inputs and outputs").unwrap();
        assert_eq!(sealed.len(), 18 + SEAL_OVERHEAD);
        assert!(!sealed.windows(6).any(|window| window == b"inputs"));
        assert_eq!(open(&secret, &sealed).unwrap(), b"inputs and outputs");
        assert_eq!(
            open(&[8u8; 32], &sealed),
            Err(SealError::WrongKeyOrTampered)
        );
        let mut altered = sealed.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert_eq!(open(&secret, &altered), Err(SealError::WrongKeyOrTampered));
        assert_eq!(
            open(&secret, &sealed[..10]),
            Err(SealError::TooShort { len: 10 })
        );
        // Another one-time key seals the same sample to other bytes.
        assert_ne!(
            seal(&recipient, [10u8; 32], b"inputs and outputs").unwrap(),
            sealed
        );
    }
}
