//! Keys, key ids, signatures and digests.
//!
//! Release keys and device keys are ed25519. A key id is the SHA-256 of the public key, so a
//! signature names its key without the key itself, and two entries naming the same key are seen
//! as one.

use std::fmt;
use std::sync::OnceLock;

use curve25519_dalek::constants::EIGHT_TORSION;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
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
        let signature = Signature::from_bytes(&signature.0);
        self.0.verify_strict(message, &signature).is_ok()
    }
}

/// One signature for [`verify_batch`]: made by `key` over `message`.
#[derive(Debug, Clone, Copy)]
pub struct BatchItem<'a> {
    pub message: &'a [u8],
    pub signature: &'a SignatureBytes,
    pub key: &'a PreparedKey,
}

/// Checks many signatures, each by its own key over its own message, and says for each whether
/// it holds: the answer at index `i` is for `items[i]`.
///
/// Signatures that [`PreparedKey::verify`] refuses before any arithmetic (an `R` that is a
/// small-order point, a weak key) are refused here too. The rest are checked together with one
/// multiscalar multiplication, about half the work of checking them one by one from eight
/// signatures on. If that fails, each is checked alone with [`PreparedKey::verify`], so a bad
/// signature fails only itself.
///
/// The batch equation, unlike `verify_strict`, can also hold for a signature whose `R` carries a
/// small-order component. Only the holder of the key can make one, so it forges nothing; it just
/// means such a signature may pass in a batch and fail alone.
pub fn verify_batch(items: &[BatchItem<'_>]) -> Vec<bool> {
    if let [item] = items {
        return vec![item.key.verify(item.message, item.signature)];
    }
    let mut results: Vec<bool> = items
        .iter()
        .map(|item| !has_small_order_r(item.signature) && !item.key.0.is_weak())
        .collect();
    let checked: Vec<&BatchItem<'_>> = items
        .iter()
        .zip(&results)
        .filter_map(|(item, ok)| ok.then_some(item))
        .collect();
    let messages: Vec<&[u8]> = checked.iter().map(|item| item.message).collect();
    let signatures: Vec<Signature> = checked
        .iter()
        .map(|item| Signature::from_bytes(&item.signature.0))
        .collect();
    let keys: Vec<VerifyingKey> = checked.iter().map(|item| item.key.0).collect();
    if checked.len() > 1 && ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok() {
        return results;
    }
    for (item, ok) in items.iter().zip(results.iter_mut()) {
        if *ok {
            *ok = item.key.verify(item.message, item.signature);
        }
    }
    results
}

/// True when the signature's `R` decodes to one of the eight small-order points, which
/// `verify_strict` refuses. Compared by encoding, so no square root is taken.
fn has_small_order_r(signature: &SignatureBytes) -> bool {
    let r: &[u8] = &signature.0[..32];
    small_order_encodings()
        .iter()
        .any(|encoding| encoding.as_slice() == r)
}

/// Every 32-byte string that decompresses to a small-order point: each point's canonical
/// encoding; for a `y` below 19, also `y + p` (the field element is reduced on decoding); and where
/// `x` is 0 (`y` = ±1), both sign bits, since the sign of zero is not checked.
fn small_order_encodings() -> &'static [[u8; 32]] {
    static ENCODINGS: OnceLock<Vec<[u8; 32]>> = OnceLock::new();
    ENCODINGS.get_or_init(|| {
        let mut out = Vec::new();
        for point in EIGHT_TORSION {
            let canonical = point.compress().to_bytes();
            let sign = canonical[31] & 0x80;
            let mut y = canonical;
            y[31] &= 0x7f;
            let mut ys = vec![y];
            if y[0] < 19 && y[1..].iter().all(|byte| *byte == 0) {
                // p = 2^255 - 19: 0xed, then 0xff up to the last byte, 0x7f.
                let mut alias = [0xff; 32];
                alias[0] = 0xed + y[0];
                alias[31] = 0x7f;
                ys.push(alias);
            }
            // x is 0 exactly where y is 1 or p - 1.
            let mut one = [0; 32];
            one[0] = 1;
            let mut minus_one = [0xff; 32];
            minus_one[0] = 0xec;
            minus_one[31] = 0x7f;
            let x_is_zero = y == one || y == minus_one;
            for y in ys {
                let signs: &[u8] = if x_is_zero { &[0, 0x80] } else { &[sign] };
                for bit in signs {
                    let mut encoding = y;
                    encoding[31] |= bit;
                    if !out.contains(&encoding) {
                        out.push(encoding);
                    }
                }
            }
        }
        out
    })
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

#[cfg(test)]
mod tests {
    use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
    use curve25519_dalek::edwards::CompressedEdwardsY;
    use curve25519_dalek::scalar::Scalar;
    use curve25519_dalek::traits::{Identity, IsIdentity};
    use sha2::Sha512;

    use super::*;

    fn signed(count: u8) -> Vec<(Vec<u8>, SignatureBytes, PreparedKey)> {
        (0..count)
            .map(|i| {
                let key = SecretKey::from_seed([i; 32]);
                let message = format!("POST /device/v2/checkin {i}").into_bytes();
                let signature = key.sign(&message);
                (message, signature, key.public().prepare().unwrap())
            })
            .collect()
    }

    fn batch(signed: &[(Vec<u8>, SignatureBytes, PreparedKey)]) -> Vec<bool> {
        let items: Vec<BatchItem<'_>> = signed
            .iter()
            .map(|(message, signature, key)| BatchItem {
                message,
                signature,
                key,
            })
            .collect();
        verify_batch(&items)
    }

    #[test]
    fn every_small_order_encoding_is_listed_and_decodes_to_small_order() {
        let encodings = small_order_encodings();
        // 8 points: 4 of order 8 (one encoding each), the two with y = 0 (and y + p), the
        // identity (y = 1 or 1 + p, either sign), and (0, -1) (either sign).
        assert_eq!(encodings.len(), 14);
        for encoding in encodings {
            let point = CompressedEdwardsY(*encoding).decompress().unwrap();
            assert!(point.is_small_order(), "{}", hex::encode(encoding));
        }
        for point in EIGHT_TORSION {
            assert!(encodings.contains(&point.compress().to_bytes()));
        }
        for (_, signature, _) in signed(32) {
            assert!(!has_small_order_r(&signature));
        }
    }

    #[test]
    fn a_batch_of_good_signatures_all_pass() {
        assert_eq!(batch(&signed(20)), vec![true; 20]);
        assert_eq!(batch(&signed(1)), vec![true]);
        assert!(batch(&[]).is_empty());
    }

    #[test]
    fn a_bad_signature_fails_only_itself() {
        let mut items = signed(16);
        items[7].0.push(b'!');
        items[11].1 .0[40] ^= 1;
        let expected: Vec<bool> = (0..16).map(|i| i != 7 && i != 11).collect();
        assert_eq!(batch(&items), expected);
    }

    /// Each is checked in a batch of good signatures, where the batch equation alone would let
    /// the first two through.
    #[test]
    fn what_verify_strict_refuses_up_front_is_refused_in_a_batch() {
        // A weak key (the identity): R = rB, s = r satisfies the equation for any message.
        let weak = PublicKey(CompressedEdwardsY::identity().to_bytes())
            .prepare()
            .unwrap();
        let r = Scalar::from(12345u64);
        let mut forged = [0u8; 64];
        forged[..32].copy_from_slice(&(r * ED25519_BASEPOINT_POINT).compress().to_bytes());
        forged[32..].copy_from_slice(r.as_bytes());
        let weak_key = (b"anything".to_vec(), SignatureBytes(forged), weak);

        // The key's holder signing with R = the identity (non-canonically encoded): s = k·a.
        let holder = SecretKey::from_seed([9; 32]);
        let public = holder.public();
        let expanded = Sha512::digest(holder.seed());
        let mut a = [0u8; 32];
        a.copy_from_slice(&expanded[..32]);
        a[0] &= 248;
        a[31] &= 127;
        a[31] |= 64;
        let a = Scalar::from_bytes_mod_order(a);
        let identity_r = small_order_encodings()
            .iter()
            .find(|encoding| {
                **encoding != CompressedEdwardsY::identity().to_bytes()
                    && CompressedEdwardsY(**encoding)
                        .decompress()
                        .is_some_and(|point| point.is_identity())
            })
            .unwrap();
        let message = b"POST /device/v2/checkin".to_vec();
        let mut hash = Sha512::new();
        hash.update(identity_r);
        hash.update(public.0);
        hash.update(&message);
        let k = Scalar::from_bytes_mod_order_wide(&hash.finalize().into());
        let mut small_r = [0u8; 64];
        small_r[..32].copy_from_slice(identity_r);
        small_r[32..].copy_from_slice((k * a).as_bytes());
        let small_order_r = (message, SignatureBytes(small_r), public.prepare().unwrap());

        // s not reduced below the group order.
        let (message, signature, key) = signed(1).remove(0);
        let mut wide = signature.0;
        let mut s = [0u8; 32];
        s.copy_from_slice(&wide[32..]);
        add_group_order(&mut s);
        wide[32..].copy_from_slice(&s);
        let unreduced = (message, SignatureBytes(wide), key);

        for bad in [weak_key, small_order_r, unreduced] {
            assert!(!bad.2.verify(&bad.0, &bad.1));
            let mut items = signed(6);
            items.push(bad);
            assert_eq!(batch(&items), [vec![true; 6], vec![false]].concat());
        }
    }

    /// Adds l = 2^252 + 27742317777372353535851937790883648493 to a little-endian scalar.
    fn add_group_order(scalar: &mut [u8; 32]) {
        const L: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let mut carry = 0u16;
        for (byte, add) in scalar.iter_mut().zip(L) {
            let sum = u16::from(*byte) + u16::from(add) + carry;
            *byte = sum as u8;
            carry = sum >> 8;
        }
    }
}
