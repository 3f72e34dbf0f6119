//! Hostile and broken frames get a typed refusal from every decoder: never a panic, never a large
//! allocation.
//!
//! Every frame a device or hub decodes came from the network or disk, so these tests feed each
//! decoder truncated, oversized, mislabelled and random input and check the exact [`DecodeReason`]
//! it answers with. A length prefix claiming `usize::MAX` elements must not make the decoder reserve
//! memory for them; a counting global allocator in this test binary checks that.

// The counting allocator below must implement `GlobalAlloc`, an unsafe trait, and forward to
// `System`'s unsafe methods. That is the only unsafe code, it is confined to this test binary, and
// it is what lets a test observe allocation sizes without instrumenting the crate under test.
#![allow(unsafe_code)]

mod samples;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::LazyLock;

use outpost_protocol::capture::{CaptureAllowances, CaptureRequest, CaptureSample, CaptureUpload};
use outpost_protocol::device::{
    CheckIn, CheckInResponse, EnrollRequest, EnrollResponse, ErrorResponse, HeldCheckIn,
    HeldCheckInResponse, ModelsCheckIn, ModelsCheckInResponse, RuntimeReport, StatusReport,
    TelemetryBatch, ValidationSet,
};
use outpost_protocol::drift::{DriftSummary, Profile};
use outpost_protocol::envelope::{HEADER_LEN, MAGIC, PROTOCOL_VERSION};
use outpost_protocol::trust::{CaptureBody, ManifestBody, PlanBody, RetireBody, RootBody, Signed};
use outpost_protocol::{
    decode, encode, DecodeError, DecodeReason, Message, MessageKind, VerifiedPlan, VerifiedRoot,
    VerifyError,
};
use proptest::collection::vec;
use proptest::prelude::*;

use samples::*;

/// Largest single allocation tolerated while decoding a hostile frame. The hostile frames are a
/// few dozen bytes long; anything near this size means a length prefix was trusted.
const ALLOCATION_LIMIT: usize = 64 * 1024;

/// Records the largest single allocation request made by a thread that opted in, so parallel
/// tests allocating freely on other threads cannot disturb the measurement.
struct PeakTracker;

static PEAK_REQUEST: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
}

fn note_request(size: usize) {
    // `try_with` rather than `with`: allocations also happen while thread-locals are torn down.
    if TRACKING.try_with(Cell::get).unwrap_or(false) {
        PEAK_REQUEST.fetch_max(size, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for PeakTracker {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_request(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_request(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_request(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: PeakTracker = PeakTracker;

/// Runs `work` and returns its result with the largest single allocation it requested. Only one
/// test calls this, because the peak counter itself is shared by all threads.
fn largest_allocation_during<T>(work: impl FnOnce() -> T) -> (T, usize) {
    PEAK_REQUEST.store(0, Ordering::Relaxed);
    TRACKING.set(true);
    let result = work();
    TRACKING.set(false);
    (result, PEAK_REQUEST.load(Ordering::Relaxed))
}

/// One message type's decoder, with a valid sample frame of it.
struct Decoder {
    name: &'static str,
    kind: MessageKind,
    max_frame: usize,
    sample: Vec<u8>,
    decode: fn(&[u8]) -> Result<(), DecodeError>,
}

fn decode_as<M: Message>(frame: &[u8]) -> Result<(), DecodeError> {
    decode::<M>(frame).map(drop)
}

fn decoder<M: Message>(sample: &M) -> Decoder {
    Decoder {
        name: M::NAME,
        kind: M::KIND,
        max_frame: M::MAX_FRAME,
        sample: encode(sample).expect("sample encodes"),
        decode: decode_as::<M>,
    }
}

/// Every message type, with one entry per [`Status`](outpost_protocol::device::Status) variant so
/// each variant's encoding is cut and mutated too. Built once: the samples sign documents.
static DECODERS: LazyLock<Vec<Decoder>> = LazyLock::new(|| {
    let decoded = |frame: Vec<u8>| -> Signed<PlanBody> { decode(&frame).expect("sample decodes") };
    let decoded_retire =
        |frame: Vec<u8>| -> Signed<RetireBody> { decode(&frame).expect("sample decodes") };
    let mut decoders = vec![
        decoder(&signed_root(2, 5, 3)),
        decoder(&sign_with(&manifest_body(7), &release_keys(5), 3)),
        decoder(&decoded(plan_frame(5, 3))),
        decoder(&root_body(2, 5, 3)),
        decoder(&manifest_body(7)),
        decoder(
            &decoded(plan_frame(1, 1))
                .decode_unverified()
                .expect("sample decodes"),
        ),
        decoder(&validation_set()),
        decoder(&enroll_request()),
        decoder(&enroll_response()),
        decoder(&check_in()),
        decoder(&check_in_response()),
        decoder(&held_check_in()),
        decoder(&held_unchanged()),
        decoder(&models_check_in()),
        decoder(&models_check_in_response()),
        decoder(&retire_body()),
        decoder(&decoded_retire(retire_frame(3, 2))),
        decoder(&runtime_report()),
        decoder(&telemetry_batch(100)),
        decoder(&telemetry_ack()),
        decoder(&error_response()),
        decoder(&drift_profile()),
        decoder(&drift_summary()),
        decoder(&capture_body()),
        decoder(&decode::<Signed<CaptureBody>>(&capture_frame(3, 2)).expect("sample decodes")),
        decoder(&capture_request()),
        decoder(&capture_allowances()),
        decoder(&capture_sample()),
        decoder(&capture_upload()),
        decoder(&capture_ack()),
    ];
    decoders.extend(status_reports().iter().map(decoder));
    decoders
});

#[test]
fn decoders_cover_every_message_kind() {
    let kinds: HashSet<MessageKind> = DECODERS.iter().map(|decoder| decoder.kind).collect();
    assert_eq!(kinds.len(), 31);
    for decoder in DECODERS.iter() {
        assert_eq!(
            (decoder.decode)(&decoder.sample),
            Ok(()),
            "{}",
            decoder.name
        );
    }
}

/// Asserts `result` is a refusal naming `decoder`'s message for exactly `reason`.
#[track_caller]
fn assert_refused(decoder: &Decoder, result: Result<(), DecodeError>, reason: DecodeReason) {
    assert_eq!(
        result,
        Err(DecodeError {
            message: decoder.name,
            reason
        })
    );
}

#[test]
fn every_prefix_of_a_valid_frame_is_refused() {
    for decoder in DECODERS.iter() {
        let frame = &decoder.sample;
        for len in 0..HEADER_LEN {
            assert_refused(
                decoder,
                (decoder.decode)(&frame[..len]),
                DecodeReason::TruncatedHeader { len },
            );
        }
        for len in HEADER_LEN..frame.len() {
            // Postcard is self-delimiting, so a cut body always runs out of bytes mid-field:
            // a cut never reads as a shorter valid message.
            assert_refused(
                decoder,
                (decoder.decode)(&frame[..len]),
                DecodeReason::Truncated,
            );
        }
    }
}

#[test]
fn oversized_frames_are_refused_before_anything_else() {
    for decoder in DECODERS.iter() {
        let len = decoder.max_frame + 1;
        let oversized = DecodeReason::Oversized {
            len,
            max: decoder.max_frame,
        };
        // A valid frame padded past the cap: the length check wins over a good header and body.
        let mut padded = decoder.sample.clone();
        padded.resize(len, 0);
        assert_refused(decoder, (decoder.decode)(&padded), oversized.clone());
        // Garbage with no valid header: still the length, not the magic, is reported.
        assert_refused(decoder, (decoder.decode)(&vec![0xa5; len]), oversized);
    }
}

#[test]
fn wrong_magic_is_refused() {
    for decoder in DECODERS.iter() {
        let mut frame = decoder.sample.clone();
        frame[..2].copy_from_slice(b"PO");
        assert_refused(
            decoder,
            (decoder.decode)(&frame),
            DecodeReason::BadMagic { found: *b"PO" },
        );
    }
}

#[test]
fn unsupported_version_is_refused() {
    for decoder in DECODERS.iter() {
        for version in [0, PROTOCOL_VERSION + 1, u8::MAX] {
            let mut frame = decoder.sample.clone();
            frame[2] = version;
            assert_refused(
                decoder,
                (decoder.decode)(&frame),
                DecodeReason::UnsupportedVersion { found: version },
            );
        }
    }
}

#[test]
fn wrong_kind_is_refused_and_named() {
    for decoder in DECODERS.iter() {
        // Another known kind is named by its variant, so a misrouted frame is easy to diagnose.
        let other = if decoder.kind == MessageKind::CheckIn {
            MessageKind::TelemetryAck
        } else {
            MessageKind::CheckIn
        };
        let mut frame = decoder.sample.clone();
        frame[3] = other as u8;
        assert_refused(
            decoder,
            (decoder.decode)(&frame),
            DecodeReason::WrongKind {
                found: format!("{other:?}"),
            },
        );
        frame[3] = 200;
        assert_refused(
            decoder,
            (decoder.decode)(&frame),
            DecodeReason::WrongKind {
                found: "unknown kind 200".to_owned(),
            },
        );
    }
}

#[test]
fn trailing_bytes_are_refused() {
    for decoder in DECODERS.iter() {
        let mut frame = decoder.sample.clone();
        frame.extend_from_slice(&[0, 1, 2]);
        assert_refused(
            decoder,
            (decoder.decode)(&frame),
            DecodeReason::TrailingBytes { count: 3 },
        );
    }
}

/// The postcard varint of `usize::MAX` (2^64-1 on 64-bit targets): the largest length prefix the
/// decoder reads as a length. Postcard reads lengths as `usize`, so on a 32-bit device (armv7)
/// anything longer is a bad varint, refused before it is a length at all.
fn huge_length() -> Vec<u8> {
    postcard::to_allocvec(&usize::MAX).expect("a usize encodes")
}

/// A frame of `M` whose body is `fields` followed by [`huge_length`].
fn huge_length_frame<M: Message>(fields: &[u8]) -> Vec<u8> {
    let mut frame = vec![MAGIC[0], MAGIC[1], PROTOCOL_VERSION, M::KIND as u8];
    frame.extend_from_slice(fields);
    frame.extend_from_slice(&huge_length());
    frame
}

/// A hostile frame, the decoder it targets, and where the huge length sits.
type HostileFrame = (Vec<u8>, fn(&[u8]) -> Result<(), DecodeError>, &'static str);

fn hostile<M: Message>(fields: &[u8], place: &'static str) -> HostileFrame {
    (huge_length_frame::<M>(fields), decode_as::<M>, place)
}

/// Frames with a `usize::MAX` length where a `Vec`, byte string or `String` length goes, reached through
/// the fields that precede it (small varints, `None`/`Some` tags, enum variant indices).
fn hostile_frames() -> Vec<HostileFrame> {
    let key_id = [0x33; 32];
    let mut one_signature = vec![0x00, 0x01];
    one_signature.extend_from_slice(&key_id);
    let zero_f64s = [0u8; 16];
    // A drift summary up to its feature list: empty model name, version 1, a profile hash, and a
    // one-hour window.
    let mut summary_head = vec![0, 1];
    summary_head.extend_from_slice(&[0x11; 32]);
    summary_head.extend_from_slice(&[0, 1]);
    // ...and into its first feature's bins: seven counts and five moments.
    let mut summary_bins = summary_head.clone();
    summary_bins.push(1);
    summary_bins.extend_from_slice(&[0; 7]);
    summary_bins.extend_from_slice(&[0; 40]);
    let mut tensor_data = zero_f64s.to_vec();
    tensor_data.extend_from_slice(&[1, 1, 0, 0, 0]);
    // A runtime report of one entry up to its providers: an empty name, version 1, tract, an
    // empty runtime version; and on to its fallback: no providers, `Some`.
    let runtime_head = [1, 0, 1, 0, 0];
    let runtime_fallback = [&runtime_head[..], &[0, 1]].concat();
    vec![
        hostile::<Signed<RootBody>>(&[], "signed root payload bytes"),
        hostile::<Signed<ManifestBody>>(&[0x00], "signed manifest signature list"),
        hostile::<Signed<PlanBody>>(&one_signature, "signed plan signature bytes"),
        hostile::<RootBody>(&[1, 1, 2, 1], "root key list"),
        hostile::<ManifestBody>(&[], "manifest name"),
        hostile::<ManifestBody>(&[0, 1, 1, 2], "manifest artifact list"),
        hostile::<PlanBody>(&[1, 1, 2], "plan target name"),
        hostile::<RetireBody>(&[1, 1, 2], "retirement model name"),
        hostile::<Signed<RetireBody>>(&[], "signed retirement payload bytes"),
        hostile::<Signed<CaptureBody>>(&[], "signed capture allowance payload bytes"),
        hostile::<CaptureBody>(&[1, 1, 2], "capture allowance model name"),
        hostile::<CaptureRequest>(&[], "capture request model list"),
        hostile::<CaptureAllowances>(&[], "capture allowances list"),
        hostile::<CaptureSample>(&[], "capture sample model name"),
        hostile::<CaptureUpload>(&[], "capture upload sample list"),
        hostile::<ValidationSet>(&zero_f64s, "validation case list"),
        hostile::<ValidationSet>(&tensor_data, "validation tensor data"),
        hostile::<EnrollRequest>(&[], "enroll token"),
        hostile::<EnrollResponse>(&[0x5c; 16], "enroll response label list"),
        hostile::<CheckIn>(&[0, 1], "check-in running model name"),
        hostile::<CheckInResponse>(&[0], "check-in response root list"),
        hostile::<CheckInResponse>(&[0, 1], "check-in response root bytes"),
        hostile::<HeldCheckIn>(&[0, 1], "held check-in running model name"),
        hostile::<HeldCheckInResponse>(&[1, 0], "held check-in response root list"),
        hostile::<ModelsCheckIn>(&[0], "models check-in model list"),
        hostile::<ModelsCheckIn>(&[0, 1], "models check-in model name"),
        hostile::<ModelsCheckInResponse>(&[0], "models check-in response root list"),
        hostile::<ModelsCheckInResponse>(&[0, 0, 0], "models check-in response model list"),
        hostile::<StatusReport>(&[0, 0, 3], "status report failure reason"),
        hostile::<RuntimeReport>(&[], "runtime report model list"),
        hostile::<RuntimeReport>(&[1], "runtime report model name"),
        hostile::<RuntimeReport>(&runtime_head, "runtime report provider list"),
        hostile::<RuntimeReport>(&runtime_fallback, "runtime report fallback reason"),
        hostile::<TelemetryBatch>(&[0], "telemetry window list"),
        hostile::<TelemetryBatch>(&[0, 1, 0, 0, 0, 0, 0, 0], "telemetry latency buckets"),
        hostile::<ErrorResponse>(&[0x99, 0x03], "error response message"),
        hostile::<Profile>(&[], "profile feature list"),
        hostile::<Profile>(&[1], "profile feature name"),
        hostile::<Profile>(&[0], "profile class list"),
        hostile::<DriftSummary>(&[], "drift summary model name"),
        hostile::<DriftSummary>(&summary_head, "drift summary feature list"),
        hostile::<DriftSummary>(&summary_bins, "drift summary bins"),
    ]
}

/// A signed document whose payload is a hostile frame of `B`, validly signed by `signers`, so a
/// verifier gets past the signature check and must refuse the payload as it decodes it.
fn signed_hostile_payload<B: outpost_protocol::trust::SignedBody>(
    template: &B,
    fields: &[u8],
    signers: &[outpost_protocol::SecretKey],
) -> Vec<u8>
where
    Signed<B>: Message,
{
    let mut signed = Signed::new(template).expect("template encodes");
    signed.payload = huge_length_frame::<B>(fields);
    for key in signers {
        signed.sign(key);
    }
    encode(&signed).expect("hostile document encodes")
}

fn decode_failure(name: &'static str, reason: DecodeReason) -> VerifyError {
    VerifyError::Decode(DecodeError {
        message: name,
        reason,
    })
}

#[test]
fn huge_length_prefixes_are_refused_without_large_allocations() {
    // The instrument must be able to see a large allocation, or the assertions below prove nothing.
    let (buffer, peak) = largest_allocation_during(|| Vec::<u8>::with_capacity(256 * 1024));
    drop(buffer);
    assert!(
        peak >= 256 * 1024,
        "allocation tracker saw only {peak} bytes"
    );

    let root = verified_root(1, 1);
    let keys = release_keys(1);
    let signed_manifest = signed_hostile_payload(&manifest_body(7), &[], &keys);
    let plan_template = decode::<Signed<PlanBody>>(&plan_frame(1, 1))
        .expect("sample plan decodes")
        .decode_unverified()
        .expect("sample plan body decodes");
    let signed_plan = signed_hostile_payload(&plan_template, &[1, 1, 2], &keys);
    let signed_rotation = signed_hostile_payload(&root_body(2, 1, 1), &[2, 1, 2, 1], &keys);
    let hostile_root = huge_length_frame::<Signed<RootBody>>(&[]);
    let frames = hostile_frames();

    let (outcomes, peak) = largest_allocation_during(|| {
        let decoded: Vec<_> = frames
            .iter()
            .map(|(frame, decode, place)| (*place, decode(frame)))
            .collect();
        let verified = [
            VerifiedRoot::load_trusted(&hostile_root).map(drop),
            root.verify_rotation(&hostile_root).map(drop),
            root.verify_rotation(&signed_rotation).map(drop),
            root.verify_manifest(&signed_manifest, &floor(), None)
                .map(drop),
            root.verify_plan(&signed_plan, &floor(), None).map(drop),
        ];
        (decoded, verified)
    });

    let (decoded, verified) = outcomes;
    for (place, result) in decoded {
        let error = result.expect_err(place);
        assert_eq!(error.reason, DecodeReason::Truncated, "{place}");
    }
    let truncated = DecodeReason::Truncated;
    assert_eq!(
        verified,
        [
            Err(decode_failure("signed root", truncated.clone())),
            Err(decode_failure("signed root", truncated.clone())),
            Err(decode_failure("root", truncated.clone())),
            Err(decode_failure("manifest", truncated.clone())),
            Err(decode_failure("plan", truncated)),
        ]
    );
    assert!(
        peak <= ALLOCATION_LIMIT,
        "decoding hostile frames requested a single allocation of {peak} bytes"
    );

    // A length past 128 elements is never taken as a capacity hint, even when it fits in the
    // bytes left (envelope's `CautiousHints` flavor withholds it), so a 48 KiB frame claiming
    // ~48,000 keys allocates only as the keys actually present decode: at most about twice the
    // frame, never serde's 1 MiB pre-allocation ceiling.
    let mut keys_claimed = header(MessageKind::RootBody);
    keys_claimed.extend_from_slice(&[1, 1, 2, 1, 0xc0, 0xb8, 0x02]);
    keys_claimed.resize(RootBody::MAX_FRAME, 0x07);
    let (result, peak) = largest_allocation_during(|| decode::<RootBody>(&keys_claimed));
    assert_eq!(
        result.map(drop).map_err(|e| e.reason),
        Err(DecodeReason::Truncated)
    );
    assert!(
        peak <= 2 * RootBody::MAX_FRAME,
        "a 48 KiB root frame requested {peak} bytes at once"
    );

    // Up to 128 elements a length that the bytes left could hold is taken as the capacity: a
    // batch claiming 128 telemetry windows costs at most 128 windows at once, one claiming 129
    // nothing past what decodes (here, not one window: the junk is no valid window).
    let window = std::mem::size_of::<outpost_protocol::device::InferenceWindow>();
    for (claim, most) in [([0x80, 0x01], 128 * window), ([0x81, 0x01], window)] {
        let mut windows_claimed = header(MessageKind::TelemetryBatch);
        windows_claimed.push(1);
        windows_claimed.extend_from_slice(&claim);
        windows_claimed.resize(windows_claimed.len() + 300, 0x07);
        let (result, peak) =
            largest_allocation_during(|| decode::<TelemetryBatch>(&windows_claimed));
        assert!(result.is_err(), "{claim:?}");
        assert!(
            peak <= most,
            "a batch claiming windows {claim:?} requested {peak} bytes at once"
        );
    }
}

/// Regression: a document stuffed with repeated bad signatures by one trusted key used to cost one
/// ed25519 verification per copy. Each key is now tried once; the copies count as duplicates.
#[test]
fn repeated_bad_signatures_are_checked_once() {
    let root = verified_root(1, 1);
    let mut signed: Signed<ManifestBody> = Signed::new(&manifest_body(1)).unwrap();
    signed.sign(&release_key(0));
    let mut forged = signed.signatures[0].clone();
    forged.signature.0[0] ^= 1;
    signed.signatures = vec![forged; 500];
    let frame = outpost_protocol::encode(&signed).unwrap();
    let error = root.verify_manifest(&frame, &floor(), None).unwrap_err();
    assert!(
        matches!(
            error,
            VerifyError::ThresholdNotMet {
                valid: 0,
                invalid: 1,
                duplicates: 499,
                ..
            }
        ),
        "{error:?}"
    );
}

#[test]
fn hostile_frames_name_their_message() {
    // The huge-length test checks the reason; this checks each refusal names the right message,
    // so a log line points at the right decoder.
    let names: Vec<&str> = hostile_frames()
        .iter()
        .map(|(frame, decode, place)| decode(frame).expect_err(place).message)
        .collect();
    assert_eq!(names.len(), 42);
    for ((frame, _, place), name) in hostile_frames().iter().zip(names) {
        let decoder = DECODERS
            .iter()
            .find(|decoder| decoder.kind as u8 == frame[3])
            .expect("every hostile frame has a known kind");
        assert_eq!(name, decoder.name, "{place}");
    }
}

#[test]
fn varint_longer_than_64_bits_is_malformed() {
    // Ten continuation bytes overflow a u64: postcard reports a bad varint, not a short body.
    let mut frame = vec![
        MAGIC[0],
        MAGIC[1],
        PROTOCOL_VERSION,
        MessageKind::ErrorResponse as u8,
    ];
    frame.extend_from_slice(&[
        0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
    ]);
    let error = decode::<ErrorResponse>(&frame).expect_err("an 11-byte varint is refused");
    assert_eq!(error.message, "error response");
    assert!(
        matches!(error.reason, DecodeReason::Malformed(_)),
        "{error:?}"
    );
}

#[test]
fn rotation_from_the_highest_root_version_is_refused() {
    // Regression: `verify_rotation` computed `trusted version + 1` unchecked, so a trusted root at
    // version u64::MAX made it panic (debug) or wrap to 0 (release) on any validly signed rotation.
    let keys = release_keys(1);
    let last = sign_with(&root_body(u64::MAX, 1, 1), &keys, 1);
    let root = VerifiedRoot::load_trusted(&encode(&last).expect("root encodes"))
        .expect("a self-signed root at the highest version loads");
    let next = sign_with(&root_body(1, 1, 1), &keys, 1);
    let result = root.verify_rotation(&encode(&next).expect("root encodes"));
    assert_eq!(
        result.map(drop),
        Err(VerifyError::RootVersion {
            trusted: u64::MAX,
            found: 1
        })
    );
}

/// The root and the verified plan the verifier properties run random documents against.
struct Verifiers {
    root: VerifiedRoot,
    plan: VerifiedPlan,
}

static VERIFIERS: LazyLock<Verifiers> = LazyLock::new(|| {
    let root = verified_root(1, 1);
    let plan = root
        .verify_plan(&plan_frame(1, 1), &floor(), None)
        .expect("sample plan verifies");
    Verifiers { root, plan }
});

/// Runs every verifier over `bytes`, returning how many accepted them.
fn run_verifiers(bytes: &[u8]) -> usize {
    let Verifiers { root, plan } = &*VERIFIERS;
    let floor = floor();
    [
        VerifiedRoot::load_trusted(bytes).is_ok(),
        VerifiedRoot::verify_initial(bytes, &floor).is_ok(),
        root.verify_rotation(bytes).is_ok(),
        root.update(&[bytes.to_vec()], &floor).is_ok(),
        root.verify_manifest(bytes, &floor, Some(3)).is_ok(),
        root.verify_plan(bytes, &floor, Some(40)).is_ok(),
        plan.verify_manifest(root, bytes, &floor, None).is_ok(),
    ]
    .into_iter()
    .filter(|accepted| *accepted)
    .count()
}

/// A frame header for `kind`, as a valid frame of that kind would start.
fn header(kind: MessageKind) -> Vec<u8> {
    vec![MAGIC[0], MAGIC[1], PROTOCOL_VERSION, kind as u8]
}

/// Decodes `frame` with `decoder`; a refusal must name the decoder's own message.
fn check_decoder(decoder: &Decoder, frame: &[u8]) -> Result<(), TestCaseError> {
    if let Err(error) = (decoder.decode)(frame) {
        prop_assert_eq!(error.message, decoder.name);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_a_decoder(bytes in vec(any::<u8>(), 0..2048)) {
        for decoder in DECODERS.iter() {
            check_decoder(decoder, &bytes)?;
        }
    }

    #[test]
    fn random_body_behind_a_valid_header_never_panics_a_decoder(
        body in vec(any::<u8>(), 0..2048),
    ) {
        for decoder in DECODERS.iter() {
            let mut frame = header(decoder.kind);
            frame.extend_from_slice(&body);
            check_decoder(decoder, &frame)?;
        }
    }

    #[test]
    fn mutated_valid_frames_never_panic_a_decoder(
        index in 0..DECODERS.len(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        // Starting from a valid frame reaches the later fields that random bytes rarely get to.
        let decoder = &DECODERS[index];
        let mut frame = decoder.sample.clone();
        for (position, value) in &flips {
            let position = HEADER_LEN + position.index(frame.len() - HEADER_LEN);
            frame[position] ^= value;
        }
        frame.truncate(HEADER_LEN + cut.index(frame.len() - HEADER_LEN + 1));
        check_decoder(decoder, &frame)?;
    }

    #[test]
    fn random_bytes_never_panic_or_pass_a_verifier(bytes in vec(any::<u8>(), 0..2048)) {
        prop_assert_eq!(run_verifiers(&bytes), 0);
        for kind in [MessageKind::SignedRoot, MessageKind::SignedManifest, MessageKind::SignedPlan] {
            let mut frame = header(kind);
            frame.extend_from_slice(&bytes);
            prop_assert_eq!(run_verifiers(&frame), 0);
        }
    }

    #[test]
    fn validly_signed_random_payloads_never_panic_a_verifier(
        body in vec(any::<u8>(), 0..1024),
    ) {
        // Signing the random payload with the root's own key gets past the signature check, so
        // the payload decoder and the structural checks behind it see the random bytes.
        let keys = release_keys(1);
        let documents = [
            signed_payload(&root_body(2, 1, 1), &body, &keys),
            signed_payload(&manifest_body(7), &body, &keys),
            signed_payload(&VERIFIERS.plan.body().clone(), &body, &keys),
        ];
        for document in &documents {
            run_verifiers(document);
        }
    }
}

/// A signed document of `B` whose payload is a valid header followed by `body`.
fn signed_payload<B: outpost_protocol::trust::SignedBody>(
    template: &B,
    body: &[u8],
    signers: &[outpost_protocol::SecretKey],
) -> Vec<u8>
where
    Signed<B>: Message,
{
    let mut signed = Signed::new(template).expect("template encodes");
    signed.payload = header(B::KIND);
    signed.payload.extend_from_slice(body);
    for key in signers {
        signed.sign(key);
    }
    encode(&signed).expect("signed random payload fits its frame")
}
