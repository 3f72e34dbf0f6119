//! Framing for every message between device and hub.
//!
//! A frame is a four-byte header — magic `b"OP"`, protocol version, message kind — followed by the
//! postcard encoding of exactly one message, with nothing after it. Each message type declares the
//! largest frame it may arrive in; [`decode`] refuses a longer frame before it reads a single field,
//! so a peer can never make us decode (or allocate for) more than that cap.

use serde::{de::DeserializeOwned, Serialize};

/// The two bytes every frame starts with.
pub const MAGIC: [u8; 2] = *b"OP";
/// The protocol version this build speaks. A frame of another version is refused, not guessed at.
pub const PROTOCOL_VERSION: u8 = 1;
/// Bytes of header before the postcard body.
pub const HEADER_LEN: usize = 4;

/// The type tag in a frame's header. Signing covers the header too, so a signature over one kind of
/// document can never be replayed as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageKind {
    SignedRoot = 1,
    SignedManifest = 2,
    SignedPlan = 3,
    RootBody = 4,
    ManifestBody = 5,
    PlanBody = 6,
    /// The first form of the validation set: two tolerances for every output. Still read.
    ValidationSetV1 = 7,
    EnrollRequest = 10,
    EnrollResponse = 11,
    CheckIn = 12,
    CheckInResponse = 13,
    StatusReport = 14,
    TelemetryBatch = 15,
    TelemetryAck = 16,
    ErrorResponse = 17,
    Profile = 18,
    DriftSummary = 19,
    HeldCheckIn = 20,
    HeldCheckInResponse = 21,
    /// The validation set with a check per output (tolerances, top-1 agreement).
    ValidationSet = 22,
    /// A check-in naming every model the device runs, and its answer per model.
    ModelsCheckIn = 23,
    ModelsCheckInResponse = 24,
    /// A signed retirement of a model, and its body.
    SignedRetire = 25,
    RetireBody = 26,
    /// Which inference runtime serves each model of a device (`/device/v3/runtimes`).
    RuntimeReport = 27,
    /// A signed capture allowance of a model, and its body.
    SignedCapture = 28,
    CaptureBody = 29,
    /// A device's request for the allowances of the models it runs (`/device/v3/capture`), and
    /// the hub's answer.
    CaptureRequest = 30,
    CaptureAllowances = 31,
    /// A batch of sealed samples (`/device/v3/captures`), and the hub's acknowledgement.
    CaptureUpload = 32,
    CaptureAck = 33,
    /// A captured request before it is sealed to the operator's key (inside a sealed sample).
    CaptureSample = 34,
}

impl MessageKind {
    const ALL: [MessageKind; 32] = [
        MessageKind::SignedRoot,
        MessageKind::SignedManifest,
        MessageKind::SignedPlan,
        MessageKind::RootBody,
        MessageKind::ManifestBody,
        MessageKind::PlanBody,
        MessageKind::ValidationSetV1,
        MessageKind::EnrollRequest,
        MessageKind::EnrollResponse,
        MessageKind::CheckIn,
        MessageKind::CheckInResponse,
        MessageKind::StatusReport,
        MessageKind::TelemetryBatch,
        MessageKind::TelemetryAck,
        MessageKind::ErrorResponse,
        MessageKind::Profile,
        MessageKind::DriftSummary,
        MessageKind::HeldCheckIn,
        MessageKind::HeldCheckInResponse,
        MessageKind::ValidationSet,
        MessageKind::ModelsCheckIn,
        MessageKind::ModelsCheckInResponse,
        MessageKind::SignedRetire,
        MessageKind::RetireBody,
        MessageKind::RuntimeReport,
        MessageKind::SignedCapture,
        MessageKind::CaptureBody,
        MessageKind::CaptureRequest,
        MessageKind::CaptureAllowances,
        MessageKind::CaptureUpload,
        MessageKind::CaptureAck,
        MessageKind::CaptureSample,
    ];

    pub fn from_byte(byte: u8) -> Option<MessageKind> {
        Self::ALL.into_iter().find(|kind| *kind as u8 == byte)
    }
}

/// A type that travels in a frame.
pub trait Message: Serialize + DeserializeOwned {
    const KIND: MessageKind;
    /// Human name used in errors, e.g. `"check-in"`.
    const NAME: &'static str;
    /// Largest frame, header included, that [`decode`] accepts for this type.
    const MAX_FRAME: usize;
}

/// Why a frame could not be decoded. Always paired with the message name in [`DecodeError`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeReason {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    Oversized { len: usize, max: usize },
    #[error("frame of {len} bytes is shorter than the {HEADER_LEN}-byte header")]
    TruncatedHeader { len: usize },
    #[error("bad magic bytes {found:02x?}")]
    BadMagic { found: [u8; 2] },
    #[error("protocol version {found} is not supported (this build speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion { found: u8 },
    #[error("frame holds a {found} message")]
    WrongKind { found: String },
    #[error("body ends early")]
    Truncated,
    #[error("body is malformed: {0}")]
    Malformed(postcard::Error),
    #[error("{count} unexpected bytes after the body")]
    TrailingBytes { count: usize },
}

/// A frame that could not be decoded as the message it was expected to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode {message}: {reason}")]
pub struct DecodeError {
    pub message: &'static str,
    #[source]
    pub reason: DecodeReason,
}

/// A message that cannot be framed: it would exceed its own type's cap, so the peer would refuse it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{message} encodes to {len} bytes, over its {max}-byte limit")]
    TooLarge {
        message: &'static str,
        len: usize,
        max: usize,
    },
    #[error("cannot encode {message}: {source}")]
    Serialize {
        message: &'static str,
        #[source]
        source: postcard::Error,
    },
}

/// Frames `message`. Refuses to produce a frame the receiving side would reject as oversized.
pub fn encode<M: Message>(message: &M) -> Result<Vec<u8>, EncodeError> {
    let len = encoded_len(message)?;
    let mut header = Vec::with_capacity(len);
    header.extend_from_slice(&[MAGIC[0], MAGIC[1], PROTOCOL_VERSION, M::KIND as u8]);
    postcard::serialize_with_flavor(message, Frame(header)).map_err(|source| {
        EncodeError::Serialize {
            message: M::NAME,
            source,
        }
    })
}

/// postcard output into a `Vec` sized beforehand. postcard hands over each field's bytes as a
/// slice of a few bytes (a varint, a float); copying those byte by byte, or as one 8-byte word,
/// keeps the compiler's copies inline where `Vec::extend` calls `memcpy` per field, which cost a
/// fifth of encoding a drift summary.
struct Frame(Vec<u8>);

impl postcard::ser_flavors::Flavor for Frame {
    type Output = Vec<u8>;

    #[inline(always)]
    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0.push(byte);
        Ok(())
    }

    #[inline(always)]
    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        if let Ok(word) = <&[u8; 8]>::try_from(bytes) {
            self.0.extend_from_slice(word);
        } else if bytes.len() <= 16 {
            for &byte in bytes {
                self.0.push(byte);
            }
        } else {
            self.0.extend_from_slice(bytes);
        }
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

/// The length of `message`'s frame, header included, without building it; an error when
/// [`encode`] would refuse it. Measuring first costs a pass over the message and saves the
/// reallocations of growing the frame.
pub fn encoded_len<M: Message>(message: &M) -> Result<usize, EncodeError> {
    let body = postcard::experimental::serialized_size(message).map_err(|source| {
        EncodeError::Serialize {
            message: M::NAME,
            source,
        }
    })?;
    let len = HEADER_LEN + body;
    if len > M::MAX_FRAME {
        return Err(EncodeError::TooLarge {
            message: M::NAME,
            len,
            max: M::MAX_FRAME,
        });
    }
    Ok(len)
}

/// The kind a frame's header names, if it is a frame of this wire version of a known kind. Only
/// to choose a decoder: [`decode`] checks everything.
pub fn kind_of(frame: &[u8]) -> Option<MessageKind> {
    match frame.first_chunk::<HEADER_LEN>() {
        Some([m0, m1, version, kind]) if [*m0, *m1] == MAGIC && *version == PROTOCOL_VERSION => {
            MessageKind::from_byte(*kind)
        }
        _ => None,
    }
}

/// Decodes one frame holding exactly one `M`. The length cap is checked first, then the header,
/// then the body; trailing bytes are an error rather than silently ignored.
pub fn decode<M: Message>(frame: &[u8]) -> Result<M, DecodeError> {
    let fail = |reason| DecodeError {
        message: M::NAME,
        reason,
    };
    if frame.len() > M::MAX_FRAME {
        return Err(fail(DecodeReason::Oversized {
            len: frame.len(),
            max: M::MAX_FRAME,
        }));
    }
    let Some((header, body)) = frame.split_first_chunk::<HEADER_LEN>() else {
        return Err(fail(DecodeReason::TruncatedHeader { len: frame.len() }));
    };
    let [m0, m1, version, kind] = *header;
    if [m0, m1] != MAGIC {
        return Err(fail(DecodeReason::BadMagic { found: [m0, m1] }));
    }
    if version != PROTOCOL_VERSION {
        return Err(fail(DecodeReason::UnsupportedVersion { found: version }));
    }
    if kind != M::KIND as u8 {
        let found = match MessageKind::from_byte(kind) {
            Some(other) => format!("{other:?}"),
            None => format!("unknown kind {kind}"),
        };
        return Err(fail(DecodeReason::WrongKind { found }));
    }
    let mut deserializer = postcard::Deserializer::from_flavor(CautiousHints(body));
    let decoded = M::deserialize(&mut deserializer)
        .and_then(|message| Ok((message, deserializer.finalize()?)));
    match decoded {
        Ok((message, [])) => Ok(message),
        Ok((_, rest)) => Err(fail(DecodeReason::TrailingBytes { count: rest.len() })),
        Err(postcard::Error::DeserializeUnexpectedEnd) => Err(fail(DecodeReason::Truncated)),
        Err(other) => Err(fail(DecodeReason::Malformed(other))),
    }
}

/// The longest sequence whose length, read off the wire, is taken as its capacity: longer ones
/// grow only with the elements that actually decode.
const HINTED_ELEMENTS: usize = 128;

/// postcard input over a byte slice whose size hints are cautious. postcard passes a sequence's
/// length, read off the wire, to serde as a capacity hint whenever the bytes left could hold it;
/// reporting at most [`HINTED_ELEMENTS`] bytes left makes it withhold any longer hint. So a `Vec`
/// is allocated at once only for a short sequence that the bytes present could hold (128 times
/// its element's size at most: 44 KiB for a batch's telemetry windows, 352 bytes each), and a
/// claimed length never costs more: a summary's 100 features and their bins decode without
/// regrowing, and a frame claiming 48,000 keys allocates only as keys decode.
struct CautiousHints<'de>(&'de [u8]);

impl<'de> postcard::de_flavors::Flavor<'de> for CautiousHints<'de> {
    type Remainder = &'de [u8];
    type Source = &'de [u8];

    fn pop(&mut self) -> postcard::Result<u8> {
        let (first, rest) = self
            .0
            .split_first()
            .ok_or(postcard::Error::DeserializeUnexpectedEnd)?;
        self.0 = rest;
        Ok(*first)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len().min(HINTED_ELEMENTS))
    }

    fn try_take_n(&mut self, count: usize) -> postcard::Result<&'de [u8]> {
        if count > self.0.len() {
            return Err(postcard::Error::DeserializeUnexpectedEnd);
        }
        let (taken, rest) = self.0.split_at(count);
        self.0 = rest;
        Ok(taken)
    }

    fn finalize(self) -> postcard::Result<&'de [u8]> {
        Ok(self.0)
    }
}

/// What to tell a peer that speaks wire version `theirs`, seen from a build speaking
/// [`PROTOCOL_VERSION`], with `we` and `they` naming the two sides ("hub", "agent"): which side
/// speaks which version and which side to upgrade (hub first, then devices).
pub fn version_mismatch(we: &str, they: &str, theirs: u8) -> String {
    let advice = if theirs > PROTOCOL_VERSION {
        format!("upgrade the {we}")
    } else {
        format!("upgrade the {they}")
    };
    format!(
        "the {they} speaks wire version {theirs}, this {we} speaks {PROTOCOL_VERSION}: {advice} \
         (hubs first, then devices)"
    )
}

/// Reads the kind from a frame's header without decoding the body, for routing and for errors.
pub fn peek_kind(frame: &[u8]) -> Option<MessageKind> {
    match frame {
        [m0, m1, PROTOCOL_VERSION, kind, ..] if [*m0, *m1] == MAGIC => {
            MessageKind::from_byte(*kind)
        }
        _ => None,
    }
}
