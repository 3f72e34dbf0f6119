//! The drift targets: a summary from a device is decoded and validated against a small fixed
//! profile, and a decoded profile that passes its check is used the way a device and the hub use
//! it.

use std::sync::OnceLock;

use outpost_protocol::drift::{
    assess, ClassProfile, ClassSource, ClassSummary, DriftSummary, FeatureSource, NumericProfile,
    Profile, TensorSide, Thresholds,
};
use outpost_protocol::{decode, encode, sha256, Sha256};

/// 2026-01-01T00:00:00Z, an aligned hour.
const HOUR: u64 = 1_767_225_600;

/// Values every feature of a fuzzed profile is fed: ordinary, extreme and non-finite.
const VALUES: [f32; 11] = [
    0.0,
    -1.5,
    2.25,
    f32::MAX,
    f32::MIN,
    f32::MIN_POSITIVE,
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    1e-30,
    3e7,
];

/// The fixed profile summaries are validated against, and its hash.
fn fixture() -> &'static (Profile, Sha256) {
    static FIXTURE: OnceLock<(Profile, Sha256)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let numeric = |name: &str, index: u32, values: &[f64]| {
            let source = FeatureSource::Column {
                tensor: "x".to_owned(),
                index,
            };
            NumericProfile::from_values(name, TensorSide::Input, source, values)
                .expect("fixed reference values are finite")
        };
        let classes = vec![0, 1, 2];
        let mut reference = ClassSummary::new(classes.len());
        for (class, confidence) in [(0, 0.9), (1, 0.6), (2, 0.75), (0, 1.0)] {
            reference.observe(class, Some(confidence), &classes);
        }
        let profile = Profile {
            features: vec![
                numeric("x[0]", 0, &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
                numeric("x[1]", 1, &[-1.0, 0.5, 0.5, 0.5]),
            ],
            classes: vec![ClassProfile {
                name: "scores.argmax".to_owned(),
                source: ClassSource::Argmax {
                    tensor: "scores".to_owned(),
                },
                classes,
                reference,
            }],
            thresholds: Thresholds::default(),
        };
        profile.check().expect("fixed profile is valid");
        let hash = sha256(&encode(&profile).expect("fixed profile encodes"));
        (profile, hash)
    })
}

/// Decodes `frame` as a drift summary and validates it against the fixed profile, both under the
/// profile's own hash and under the hash the summary claims, so the fuzzer reaches the structural
/// checks behind the hash comparison. A valid summary is judged and merged with itself.
pub fn decode_drift_summary(frame: &[u8]) {
    let Ok(summary) = decode::<DriftSummary>(frame) else {
        return;
    };
    let (profile, hash) = fixture();
    let _ = summary.validate(profile, hash);
    if summary.validate(profile, &summary.profile_sha256).is_ok() {
        let _ = assess(profile, &summary);
        let mut doubled = summary.clone();
        if doubled.merge(&summary).is_ok() {
            let _ = doubled.validate(profile, &summary.profile_sha256);
        }
    }
}

/// Decodes `frame` as a drift profile; if it passes its check, summarises fixed values against it
/// as a device would, and judges the summary as the hub would. A summary made that way against a
/// checked profile must validate: a refusal is a finding.
pub fn decode_profile(frame: &[u8]) {
    let Ok(profile) = decode::<Profile>(frame) else {
        return;
    };
    if profile.check().is_err() {
        return;
    }
    let hash = sha256(frame);
    let mut summary = DriftSummary::new("fuzz-model", 3, hash, &profile, HOUR, HOUR + 3_600);
    for (feature, current) in profile.features.iter().zip(&mut summary.features) {
        current.observe_f32(&VALUES, &feature.edges);
        // Values beyond ~1e154 square to infinity and are documented to spoil the moments.
        for edge in feature.edges.iter().filter(|edge| edge.abs() < 1e150) {
            current.observe(*edge, &feature.edges);
        }
        current.observe_null();
    }
    for (class, current) in profile.classes.iter().zip(&mut summary.classes) {
        for value in class.classes.iter().take(3).chain(&[-1, i64::MAX]) {
            current.observe(*value, Some(0.7), &class.classes);
        }
        current.observe(0, None, &class.classes);
    }
    if let Err(error) = summary.validate(&profile, &hash) {
        panic!("a device-made summary of a checked profile was refused: {error}");
    }
    let _ = assess(&profile, &summary);
}
