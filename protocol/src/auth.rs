//! What a device signs to authenticate a request, so hub and agent build the same bytes.
//!
//! A device signs the method, the path (with query), the SHA-256 of the body, a Unix timestamp
//! and a random nonce. The hub refuses timestamps outside [`MAX_CLOCK_SKEW_SECS`] and any nonce it
//! has seen within that window, so a captured request cannot be replayed.

use crate::keys::{PublicKey, SecretKey, Sha256, SignatureBytes};

pub const HEADER_DEVICE: &str = "x-outpost-device";
pub const HEADER_TIMESTAMP: &str = "x-outpost-timestamp";
pub const HEADER_NONCE: &str = "x-outpost-nonce";
pub const HEADER_SIGNATURE: &str = "x-outpost-signature";

/// How far a request's timestamp may be from the hub's clock.
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;

const CONTEXT: &[u8] = b"outpost device request v1\0";

/// The fields a device signs for one request.
#[derive(Debug, Clone, Copy)]
pub struct RequestToSign<'a> {
    pub method: &'a str,
    pub path_and_query: &'a str,
    pub body_sha256: Sha256,
    pub timestamp: u64,
    pub nonce: [u8; 16],
}

impl RequestToSign<'_> {
    /// The bytes signed, for a verifier that checks them with others
    /// ([`crate::verify_batch`]). Unambiguous: every variable-length field is length-prefixed.
    pub fn message(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CONTEXT.len() + 96 + self.path_and_query.len());
        out.extend_from_slice(CONTEXT);
        for field in [self.method.as_bytes(), self.path_and_query.as_bytes()] {
            out.extend_from_slice(&(field.len() as u64).to_le_bytes());
            out.extend_from_slice(field);
        }
        out.extend_from_slice(&self.body_sha256.0);
        out.extend_from_slice(&self.timestamp.to_le_bytes());
        out.extend_from_slice(&self.nonce);
        out
    }

    pub fn sign(&self, key: &SecretKey) -> SignatureBytes {
        key.sign(&self.message())
    }

    pub fn verify(&self, key: &PublicKey, signature: &SignatureBytes) -> bool {
        key.verify(&self.message(), signature)
    }
}
