//! Keys, key ids, signatures and digests.
//!
//! Release keys and device keys are ed25519. A key id is the SHA-256 of the public key, so a
//! signature names its key without the key itself, and two entries naming the same key are seen
//! as one.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256 as Sha256Hasher};

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Option<Sha256> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).ok()?;
        Some(Sha256(out))
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Sha256 {
    Sha256(Sha256Hasher::digest(bytes).into())
}

/// Incremental SHA-256, for artifacts streamed from the network or disk.
#[derive(Debug, Clone, Default)]
pub struct StreamingSha256(Sha256Hasher);

impl StreamingSha256 {
    pub fn new() -> StreamingSha256 {
        StreamingSha256(Sha256Hasher::new())
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> Sha256 {
        Sha256(self.0.finalize().into())
    }
}

/// Names a public key: SHA-256 of its 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyId(pub [u8; 32]);

impl KeyId {
    /// First 8 bytes in hex: enough to tell keys apart in messages and file names.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key:{}", self.short())
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// A [`PublicKey`] already decompressed to a curve point.
#[derive(Debug, Clone)]
pub struct PreparedKey(VerifyingKey);

impl PreparedKey {
    /// [`PublicKey::verify`] without decompressing the key again.
    pub fn verify(&self, message: &[u8], signature: &SignatureBytes) -> bool {
        let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
        self.0.verify_strict(message, &signature).is_ok()
    }
}

/// An ed25519 public key as it travels: 32 bytes, checked to be a valid point when used.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn key_id(&self) -> KeyId {
        KeyId(sha256(&self.0).0)
    }

    /// Verifies `signature` over `message` with strict ed25519 rules (no small-order keys, no
    /// malleable signatures). An invalid key is simply a failed verification.
    pub fn verify(&self, message: &[u8], signature: &SignatureBytes) -> bool {
        self.prepare()
            .is_some_and(|key| key.verify(message, signature))
    }

    /// The key decompressed once, for a verifier that checks many signatures by it; none when
    /// the bytes are not a point. Decompressing is a square root, about a fifth of a verification.
    pub fn prepare(&self) -> Option<PreparedKey> {
        VerifyingKey::from_bytes(&self.0).ok().map(PreparedKey)
    }

    /// True when the bytes decode to a usable ed25519 point.
    pub fn is_valid(&self) -> bool {
        VerifyingKey::from_bytes(&self.0).is_ok_and(|key| !key.is_weak())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Option<PublicKey> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut out).ok()?;
        Some(PublicKey(out))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pubkey:{}", self.key_id().short())
    }
}

/// An ed25519 private key. Never serialized by this crate and never sent anywhere: the callers
/// that load one from disk keep it on the machine that holds it.
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// Builds a key from 32 bytes of seed. The caller supplies the randomness; this crate reads no
    /// entropy source of its own.
    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey(SigningKey::from_bytes(&seed))
    }

    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    pub fn sign(&self, message: &[u8]) -> SignatureBytes {
        SignatureBytes(self.0.sign(message).to_bytes())
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({:?})", self.public().key_id())
    }
}

/// 64 signature bytes, encoded as a byte string so decoding borrows instead of looping.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SignatureBytes(pub [u8; 64]);

impl fmt::Debug for SignatureBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sig:{}…", hex::encode(&self.0[..8]))
    }
}

impl Serialize for SignatureBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for SignatureBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = SignatureBytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<SignatureBytes, E> {
                let array = <[u8; 64]>::try_from(bytes)
                    .map_err(|_| E::invalid_length(bytes.len(), &self))?;
                Ok(SignatureBytes(array))
            }
        }
        deserializer.deserialize_bytes(Visitor)
    }
}
