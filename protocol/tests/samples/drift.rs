//! Drift profiles and summaries of realistic shape, from a small deterministic random generator so
//! every run builds byte-identical values without a random-number dependency.

use outpost_protocol::device::LATENCY_BUCKETS_US;
use outpost_protocol::drift::{
    ClassProfile, ClassSource, ClassSummary, DriftSummary, FeatureSource, NumericProfile, Profile,
    TensorSide, Thresholds,
};
use outpost_protocol::{encode, sha256, Sha256};

use super::NOW;

/// splitmix64 with Box–Muller normals: tiny, deterministic, good enough for statistics tests.
#[derive(Debug, Clone)]
pub struct SplitMix {
    state: u64,
    spare_normal: Option<f64>,
}

impl SplitMix {
    pub fn new(seed: u64) -> SplitMix {
        SplitMix {
            state: seed,
            spare_normal: None,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        if let Some(spare) = self.spare_normal.take() {
            return spare;
        }
        let radius = (-2.0 * (1.0 - self.uniform()).ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * self.uniform();
        self.spare_normal = Some(radius * angle.sin());
        radius * angle.cos()
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Mean and standard deviation of sample feature `index`: every feature is a different normal.
pub fn feature_distribution(index: usize) -> (f64, f64) {
    (index as f64 * 0.7 - 3.0, 0.5 + (index % 7) as f64 * 0.3)
}

/// Draws `n` values of sample feature `index`, its mean moved by `shift` standard deviations.
pub fn feature_values(rng: &mut SplitMix, index: usize, n: usize, shift: f64) -> Vec<f64> {
    let (mean, sd) = feature_distribution(index);
    (0..n).map(|_| mean + sd * (shift + rng.normal())).collect()
}

/// Sample feature `index`: sources cycle through every [`FeatureSource`] kind and side.
pub fn feature_source(index: usize) -> (String, TensorSide, FeatureSource) {
    let channel = (index / 6) as u32;
    match index % 6 {
        0 => (
            format!("x[{channel}]"),
            TensorSide::Input,
            FeatureSource::Column {
                tensor: "x".to_owned(),
                index: channel,
            },
        ),
        1 => (
            format!("image.mean[{channel}]"),
            TensorSide::Input,
            FeatureSource::ChannelMean {
                tensor: "image".to_owned(),
                channel,
            },
        ),
        2 => (
            format!("image.std[{channel}]"),
            TensorSide::Input,
            FeatureSource::ChannelStd {
                tensor: "image".to_owned(),
                channel,
            },
        ),
        3 => (
            format!("wide.mean[{}..{}]", channel * 128, channel * 128 + 128),
            TensorSide::Input,
            FeatureSource::SpanMean {
                tensor: "wide".to_owned(),
                start: channel * 128,
                len: 128,
            },
        ),
        4 => (
            format!("wide.std[{}..{}]", channel * 128, channel * 128 + 128),
            TensorSide::Input,
            FeatureSource::SpanStd {
                tensor: "wide".to_owned(),
                start: channel * 128,
                len: 128,
            },
        ),
        _ => (
            format!("y[{channel}]"),
            TensorSide::Output,
            FeatureSource::Column {
                tensor: "y".to_owned(),
                index: channel,
            },
        ),
    }
}

/// Classes of the sample argmax output, and how often the reference saw each.
pub const ARGMAX_WEIGHTS: [u64; 5] = [40, 25, 20, 10, 5];

/// Draws a class of the argmax output with its confidence, classes weighted by `weights`.
pub fn draw_class(rng: &mut SplitMix, weights: &[u64]) -> (i64, f32) {
    let mut pick = rng.below(weights.iter().sum());
    let mut class = 0;
    for (index, weight) in weights.iter().enumerate() {
        if pick < *weight {
            class = index;
            break;
        }
        pick -= weight;
    }
    (class as i64, (0.5 + 0.5 * rng.uniform()) as f32)
}

/// A profile of `n_features` numeric features, each from `n_reference` reference values, an
/// argmax class output and a label output.
pub fn drift_profile_with(n_features: usize, n_reference: usize) -> Profile {
    let mut rng = SplitMix::new(0x5eed);
    let features = (0..n_features)
        .map(|index| {
            let (name, side, source) = feature_source(index);
            let values = feature_values(&mut rng, index, n_reference, 0.0);
            NumericProfile::from_values(&name, side, source, &values)
                .expect("sample reference values are finite")
        })
        .collect();
    let argmax_classes: Vec<i64> = (0..ARGMAX_WEIGHTS.len() as i64).collect();
    let mut argmax = ClassSummary::new(argmax_classes.len());
    let labels = vec![-1, 3, 7];
    let mut label = ClassSummary::new(labels.len());
    for _ in 0..n_reference {
        let (class, confidence) = draw_class(&mut rng, &ARGMAX_WEIGHTS);
        argmax.observe(class, Some(confidence), &argmax_classes);
        let class = labels[rng.below(labels.len() as u64) as usize];
        label.observe(class, None, &labels);
    }
    Profile {
        features,
        classes: vec![
            ClassProfile {
                name: "scores.argmax".to_owned(),
                source: ClassSource::Argmax {
                    tensor: "scores".to_owned(),
                },
                classes: argmax_classes,
                reference: argmax,
            },
            ClassProfile {
                name: "label".to_owned(),
                source: ClassSource::Label {
                    tensor: "label".to_owned(),
                },
                classes: labels,
                reference: label,
            },
        ],
        thresholds: Thresholds::default(),
    }
}

/// A small profile: four features (one of each source kind) and two class outputs.
pub fn drift_profile() -> Profile {
    drift_profile_with(4, 2_000)
}

/// SHA-256 of `profile`'s frame, as a manifest signs the profile artifact.
pub fn profile_sha256(profile: &Profile) -> Sha256 {
    sha256(&encode(profile).expect("sample profile encodes"))
}

/// One hour of `n` values per feature from the reference distributions, with a NaN, a null and an
/// unseen label here and there, starting `hour` hours after [`NOW`].
pub fn drift_summary_of(profile: &Profile, n: usize, hour: u64, seed: u64) -> DriftSummary {
    let start = NOW + hour * 3_600;
    let hash = profile_sha256(profile);
    let mut summary = DriftSummary::new("keyword-spotter", 7, hash, profile, start, start + 3_600);
    let mut rng = SplitMix::new(seed);
    for (index, (feature, current)) in profile
        .features
        .iter()
        .zip(&mut summary.features)
        .enumerate()
    {
        let values: Vec<f32> = feature_values(&mut rng, index, n, 0.0)
            .into_iter()
            .map(|value| value as f32)
            .collect();
        current.observe_f32(&values, &feature.edges);
        if index % 2 == 1 {
            current.observe(f64::NAN, &feature.edges);
            current.observe_null();
        }
    }
    for (class, current) in profile.classes.iter().zip(&mut summary.classes) {
        for _ in 0..n {
            let (drawn, confidence) = draw_class(&mut rng, &ARGMAX_WEIGHTS);
            match class.source {
                ClassSource::Argmax { .. } => {
                    current.observe(drawn, Some(confidence), &class.classes);
                }
                // Labels past the profile's few come out as 9, a label the reference never saw.
                ClassSource::Label { .. } => {
                    let label = class.classes.get(drawn as usize).copied().unwrap_or(9);
                    current.observe(label, None, &class.classes);
                }
            }
        }
    }
    for (bucket, count) in summary.latency_us.iter_mut().enumerate() {
        *count = (bucket as u64 * 37 + n as u64) % 500;
    }
    assert_eq!(summary.latency_us.len(), LATENCY_BUCKETS_US.len() + 1);
    summary
}

/// An hour of 200 values per feature of [`drift_profile`].
pub fn drift_summary() -> DriftSummary {
    drift_summary_of(&drift_profile(), 200, 0, 7)
}
