//! The drift core against its contract: metrics from summaries equal metrics computed from raw
//! values, merges are exact in any order, summaries stay small, the flag rule keeps its false
//! positives rare and catches a half-sigma shift, non-finite and out-of-range values never enter
//! the bins, and hostile summaries are refused with an error that says what is wrong.

mod samples;

use outpost_protocol::drift::{
    assess, assess_class, assess_feature, chi_square, chi_square_quantile, hellinger, homogeneity,
    js_distance, ks_from_bins, psi, quantile_edges, ClassProfile, ClassSource, ClassSummary,
    DriftError, DriftStatus, DriftSummary, FeatureDrift, FeatureSummary, NumericProfile, Profile,
    QualityIssue, Thresholds, CLASS_KIND, CONFIDENCE_BINS, EPSILON, MAX_WINDOW_SECS, NUMERIC_KIND,
    PROFILE_EDGES,
};
use outpost_protocol::{decode, encode, DecodeError, DecodeReason, Message, Sha256};
use proptest::collection::vec;
use proptest::prelude::*;

use samples::*;

// An independent, deliberately plain implementation of binning and every metric, to check the
// crate's summaries and metrics against.

/// Bins raw values the long way: `[below, interior bins..., above]`, NaN and ±inf skipped.
fn bin_raw(values: &[f64], edges: &[f64]) -> Vec<u64> {
    let interior = edges.len() - 1;
    let mut counts = vec![0u64; interior + 2];
    for &value in values.iter().filter(|value| value.is_finite()) {
        let slot = if value < edges[0] {
            0
        } else if value > edges[interior] {
            interior + 1
        } else {
            // The first bin whose upper edge lies above the value; the last bin is closed.
            1 + (0..interior)
                .find(|&bin| value < edges[bin + 1])
                .unwrap_or(interior - 1)
        };
        counts[slot] += 1;
    }
    counts
}

/// Proportions with zero ones replaced by 1e-4 when `smooth`.
fn shares(counts: &[u64], smooth: bool) -> Vec<f64> {
    let total: u64 = counts.iter().sum();
    counts
        .iter()
        .map(|&count| {
            if count == 0 && smooth {
                1e-4
            } else {
                count as f64 / total as f64
            }
        })
        .collect()
}

fn raw_psi(reference: &[u64], current: &[u64]) -> f64 {
    let (p, q) = (shares(reference, true), shares(current, true));
    (0..p.len())
        .map(|i| (q[i] - p[i]) * (q[i] / p[i]).ln())
        .sum()
}

fn raw_js(reference: &[u64], current: &[u64]) -> f64 {
    let (p, q) = (shares(reference, true), shares(current, true));
    let mut divergence = 0.0;
    for i in 0..p.len() {
        let m = 0.5 * (p[i] + q[i]);
        divergence += 0.5 * p[i] * (p[i] / m).log2() + 0.5 * q[i] * (q[i] / m).log2();
    }
    divergence.sqrt()
}

fn raw_hellinger(reference: &[u64], current: &[u64]) -> f64 {
    let (p, q) = (shares(reference, false), shares(current, false));
    let sum: f64 = (0..p.len())
        .map(|i| (p[i].sqrt() - q[i].sqrt()).powi(2))
        .sum();
    (sum / 2.0).sqrt()
}

fn raw_chi_square(reference: &[u64], current: &[u64]) -> f64 {
    let p = shares(reference, true);
    let n: u64 = current.iter().sum();
    (0..p.len())
        .map(|i| {
            let expected = n as f64 * p[i];
            (current[i] as f64 - expected).powi(2) / expected
        })
        .sum()
}

fn raw_ks(reference: &[u64], current: &[u64]) -> f64 {
    let (p, q) = (shares(reference, false), shares(current, false));
    let (mut cp, mut cq, mut largest) = (0.0, 0.0, 0.0f64);
    for i in 0..p.len() {
        cp += p[i];
        cq += q[i];
        largest = largest.max((cp - cq).abs());
    }
    largest
}

#[track_caller]
fn assert_close(got: f64, want: f64, tolerance: f64, what: &str) {
    assert!(
        (got - want).abs() <= tolerance,
        "{what}: got {got}, want {want} (difference {})",
        (got - want).abs()
    );
}

/// `|a - b| <= 1e-9 · max(|a|, |b|, scale)`: relative, with `scale` for values that may sit near 0
/// (a mean of data spread around 0 is only as exact as the data's magnitude).
#[track_caller]
fn assert_relative(got: f64, want: f64, scale: f64, what: &str) {
    let magnitude = got.abs().max(want.abs()).max(scale);
    assert_close(got, want, 1e-9 * magnitude, what);
}

fn to_f32(values: &[f64]) -> Vec<f32> {
    values.iter().map(|value| *value as f32).collect()
}

fn widened(values: &[f32]) -> Vec<f64> {
    values.iter().map(|value| f64::from(*value)).collect()
}

/// Acceptance 1: with the same edges, metrics of two summaries equal the metrics of the raw values
/// binned independently.
#[test]
fn metrics_from_summaries_equal_metrics_from_raw_values() {
    let mut rng = SplitMix::new(1);
    let reference_values = feature_values(&mut rng, 3, 20_000, 0.0);
    let profile = NumericProfile::from_values(
        "x[3]",
        outpost_protocol::drift::TensorSide::Input,
        outpost_protocol::drift::FeatureSource::Column {
            tensor: "x".to_owned(),
            index: 3,
        },
        &reference_values,
    )
    .expect("finite reference");
    let edges = &profile.edges;
    assert_eq!(edges.len(), PROFILE_EDGES);
    let reference_bins = bin_raw(&reference_values, edges);
    assert_eq!(profile.reference.metric_bins(), reference_bins);

    let (mean, sd) = feature_distribution(3);
    let mut concentrated = vec![mean; 300];
    concentrated.extend([mean + 100.0 * sd, f64::NAN, f64::INFINITY, mean - 50.0 * sd]);
    let currents: Vec<(&str, Vec<f64>)> = vec![
        ("same distribution", feature_values(&mut rng, 3, 5_000, 0.0)),
        ("half-sigma shift", feature_values(&mut rng, 3, 5_000, 0.5)),
        ("three-sigma shift", feature_values(&mut rng, 3, 2_000, 3.0)),
        ("concentrated, with outliers", concentrated),
        ("ten values", feature_values(&mut rng, 3, 10, 0.0)),
    ];
    for (label, values) in currents {
        let values = widened(&to_f32(&values));
        let mut current = FeatureSummary::new(edges);
        current.observe_f32(&to_f32(&values), edges);
        let current_bins = bin_raw(&values, edges);
        assert_eq!(current.metric_bins(), current_bins, "{label}");

        let ours = current.metric_bins();
        let theirs = &profile.reference.metric_bins();
        let pairs = [
            (
                "psi",
                psi(theirs, &ours),
                raw_psi(&reference_bins, &current_bins),
            ),
            (
                "js",
                js_distance(theirs, &ours),
                raw_js(&reference_bins, &current_bins),
            ),
            (
                "hellinger",
                hellinger(theirs, &ours),
                raw_hellinger(&reference_bins, &current_bins),
            ),
            (
                "chi-square",
                chi_square(theirs, &ours),
                raw_chi_square(&reference_bins, &current_bins),
            ),
            (
                "ks",
                ks_from_bins(theirs, &ours),
                raw_ks(&reference_bins, &current_bins),
            ),
        ];
        for (metric, got, want) in pairs {
            // Chi-square grows with n; compare it relative to its size.
            let tolerance = 1e-12 * want.abs().max(1.0);
            assert_close(got, want, tolerance, &format!("{label}: {metric}"));
        }
    }
}

#[test]
fn metrics_follow_their_definitions_at_the_extremes() {
    let same = [10, 20, 30, 40];
    for metric in [psi, js_distance, hellinger, chi_square, ks_from_bins] {
        assert!(metric(&same, &same).abs() < 1e-12);
        // Only proportions matter, not totals.
        assert!(metric(&same, &[1, 2, 3, 4]).abs() < 1e-12);
        // No evidence either way: an empty histogram compares as no drift.
        assert_eq!(metric(&same, &[0, 0, 0, 0]), 0.0);
        assert_eq!(metric(&[], &[]), 0.0);
        // Histograms over different bins cannot be compared.
        assert!(metric(&same, &[1, 2, 3]).is_nan());
    }
    let (left, right) = ([100, 0], [0, 100]);
    assert_eq!(hellinger(&left, &right), 1.0);
    assert_eq!(ks_from_bins(&left, &right), 1.0);
    let js = js_distance(&left, &right);
    assert!(js > 0.99 && js <= 1.0, "{js}");
    // Zero proportions count as EPSILON: PSI of disjoint histograms is finite.
    let expected = 2.0 * (1.0 - EPSILON) * (1.0 / EPSILON).ln();
    assert_close(
        psi(&left, &right),
        expected,
        1e-12,
        "psi of disjoint histograms",
    );
}

/// The test of homogeneity on tables worked by hand: every count of a side expected in
/// proportion to its side's total, bins empty on both sides left out of the sum and of the
/// degrees of freedom, and no `EPSILON` anywhere.
#[test]
fn homogeneity_follows_its_definition() {
    // Each bin expects 20 a side, so each of the four corner cells adds 10² / 20.
    assert_eq!(homogeneity(&[10, 20, 30], &[30, 20, 10]), (20.0, 2));
    assert_eq!(homogeneity(&[10, 0, 20, 30], &[30, 0, 20, 10]), (20.0, 2));
    // Only the shape matters to the statistic's scale when the sides are alike.
    let (same, dof) = homogeneity(&[10, 20, 30, 40], &[1, 2, 3, 4]);
    assert!(same.abs() < 1e-12 && dof == 3, "{same} {dof}");
    // An empty bin of the current side adds what it was expected to hold, not a logarithm of
    // EPSILON: 100 a side over two bins, the current all in one.
    let (statistic, dof) = homogeneity(&[50, 50], &[100, 0]);
    assert_close(
        statistic,
        2.0 * 25.0_f64.powi(2) / 75.0 + 2.0 * 25.0_f64.powi(2) / 25.0,
        1e-12,
        "one bin empty",
    );
    assert_eq!(dof, 1);
    assert_eq!(homogeneity(&[10, 20], &[0, 0]), (0.0, 0));
    assert_eq!(homogeneity(&[], &[]), (0.0, 0));
    assert!(homogeneity(&[10, 20], &[1, 2, 3]).0.is_nan());
}

#[test]
fn chi_square_quantile_matches_table_values() {
    // Reference values from mpmath at 30 digits.
    let table = [
        (20, 0.95, 31.410_432_844_230_92),
        (1, 0.95, 3.841_458_820_694_124),
        (10, 0.99, 23.209_251_158_954_357),
        (2, 0.5, 1.386_294_361_119_890_6),
        (3, 0.001, 0.024_297_585_815_692_734),
        (100, 0.5, 99.334_129_235_988_46),
        (1_000, 0.95, 1_074.679_448_803_441),
        (1, 0.999_999, 23.928_126_976_879_47),
        (20, 0.05, 10.850_811_394_182_585),
        (50_000, 0.95, 50_521.282_932_443_14),
        (100_000, 0.95, 100_736.736_177_319),
        (19, 1e-6, 2.255_053_723_420_03),
        (2, 0.999, 13.815_510_557_964_274),
        (1, 1e-12, 1.570_796_326_794_896_6e-24),
    ];
    for (dof, p, want) in table {
        let got = chi_square_quantile(dof, p);
        assert!(
            ((got - want) / want).abs() < 1e-9,
            "chi-square quantile dof {dof} p {p}: got {got}, want {want}"
        );
    }
    // Far into the upper tail the answer is that of the f64 nearest 1 - 1e-12, which is
    // 1 - 0.99997787827987849596e-12 exactly.
    let got = chi_square_quantile(5, 0.999_999_999_999);
    let want = 65.238_682_522_583_53;
    assert!(((got - want) / want).abs() < 1e-9, "{got}");
    let mut previous = 0.0;
    for p in [1e-300, 1e-12, 0.01, 0.5, 0.95, 0.999_999, 1.0 - 1e-15] {
        let got = chi_square_quantile(20, p);
        assert!(got.is_finite() && got > previous, "p {p}: {got}");
        previous = got;
    }
    assert_eq!(chi_square_quantile(0, 0.95), 0.0);
    assert_eq!(chi_square_quantile(5, 0.0), 0.0);
    assert_eq!(chi_square_quantile(5, 1.0), f64::INFINITY);
    assert!(chi_square_quantile(5, f64::NAN).is_nan());
}

/// The fields a merge must reproduce exactly.
fn exact_fields(summary: &FeatureSummary) -> (Vec<u64>, Vec<u64>, f64, f64) {
    let counts = vec![
        summary.n,
        summary.null,
        summary.nan,
        summary.pos_inf,
        summary.neg_inf,
        summary.below,
        summary.above,
    ];
    (counts, summary.bins.clone(), summary.min, summary.max)
}

/// Asserts two summaries of the same data agree: exact fields equal, moments to 1e-9 relative.
#[track_caller]
fn assert_same_data(got: &FeatureSummary, want: &FeatureSummary, magnitude: f64) {
    assert_eq!(exact_fields(got), exact_fields(want));
    assert_relative(got.mean, want.mean, magnitude, "mean");
    assert_relative(got.sum, want.sum, magnitude, "sum");
    match (got.variance(), want.variance()) {
        (Some(got), Some(want)) => assert_relative(got, want, 1e-300, "variance"),
        (got, want) => assert_eq!(got, want),
    }
}

/// Edges of a standard normal's quantiles, scaled by three.
fn merge_edges() -> Vec<f64> {
    let mut rng = SplitMix::new(9);
    quantile_edges(&(0..1_000).map(|_| 3.0 * rng.normal()).collect::<Vec<_>>())
}

/// Values a feature might see: mostly finite ones, some right on the edges, and the odd NaN or
/// infinity.
fn raw_value() -> impl Strategy<Value = f32> {
    let edges: Vec<f32> = merge_edges().iter().map(|edge| *edge as f32).collect();
    prop_oneof![
        8 => -12.0f32..12.0,
        2 => proptest::sample::select(edges),
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
    ]
}

fn summarise(values: &[f32], edges: &[f64]) -> FeatureSummary {
    let mut summary = FeatureSummary::new(edges);
    summary.observe_f32(values, edges);
    summary
}

/// Merges `parts` in a random tree shape and order drawn from `seed`.
fn merge_randomly(mut parts: Vec<FeatureSummary>, seed: u64) -> FeatureSummary {
    let mut rng = SplitMix::new(seed);
    while parts.len() > 1 {
        let into = rng.below(parts.len() as u64) as usize;
        let mut from = rng.below(parts.len() as u64 - 1) as usize;
        if from >= into {
            from += 1;
        }
        let other = parts[from].clone();
        parts[into]
            .merge(&other)
            .expect("summaries of one profile merge");
        parts.swap_remove(from);
    }
    parts.pop().expect("at least one part")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Acceptance 2: 24 hourly summaries merged in any order and tree shape give the exact fields
    /// of one summary over all the data, and its moments to 1e-9.
    #[test]
    fn merging_24_hourly_summaries_matches_one_summary_over_all_data(
        hours in vec(vec(raw_value(), 0..120), 24),
        order in Just((0..24).collect::<Vec<usize>>()).prop_shuffle(),
        tree_seed in any::<u64>(),
    ) {
        let edges = merge_edges();
        let mut whole = FeatureSummary::new(&edges);
        for value in hours.iter().flatten() {
            whole.observe(f64::from(*value), &edges);
        }
        let hourly: Vec<FeatureSummary> =
            hours.iter().map(|values| summarise(values, &edges)).collect();

        let mut in_order = FeatureSummary::new(&edges);
        for hour in &order {
            in_order.merge(&hourly[*hour]).expect("hours merge");
        }
        assert_same_data(&in_order, &whole, 12.0);
        assert_same_data(&merge_randomly(hourly, tree_seed), &whole, 12.0);
        prop_assert_eq!(whole.check(&edges), Ok(()));
        prop_assert_eq!(in_order.check(&edges), Ok(()));
    }

    #[test]
    fn merge_is_commutative_and_associative_on_exact_fields(
        a in vec(raw_value(), 0..300),
        b in vec(raw_value(), 0..300),
        c in vec(raw_value(), 0..300),
    ) {
        let edges = merge_edges();
        let (a, b, c) = (summarise(&a, &edges), summarise(&b, &edges), summarise(&c, &edges));
        let merged = |x: &FeatureSummary, y: &FeatureSummary| {
            let mut x = x.clone();
            x.merge(y).expect("summaries of one profile merge");
            x
        };
        assert_same_data(&merged(&a, &b), &merged(&b, &a), 12.0);
        assert_same_data(&merged(&merged(&a, &b), &c), &merged(&a, &merged(&b, &c)), 12.0);
        let empty = FeatureSummary::new(&edges);
        prop_assert_eq!(merged(&a, &empty), a.clone());
        prop_assert_eq!(merged(&empty, &a), a);
    }

    /// The batch path counts exactly like the per-value path, across chunk boundaries.
    #[test]
    fn observe_f32_matches_observe_per_value(values in vec(raw_value(), 0..2_000)) {
        let edges = merge_edges();
        let batch = summarise(&values, &edges);
        let mut one_by_one = FeatureSummary::new(&edges);
        for value in &values {
            one_by_one.observe(f64::from(*value), &edges);
        }
        assert_same_data(&batch, &one_by_one, 12.0);
        // The sum is accumulated in the same order by both paths.
        prop_assert_eq!(batch.sum.to_bits(), one_by_one.sum.to_bits());
        prop_assert_eq!(batch.check(&edges), Ok(()));
    }
}

#[test]
fn hourly_drift_summaries_merge_into_a_day_in_any_order() {
    let profile = drift_profile();
    let hash = profile_sha256(&profile);
    let hours: Vec<DriftSummary> = (0..24)
        .map(|hour| drift_summary_of(&profile, 150 + hour as usize * 10, hour, 100 + hour))
        .collect();
    let merge_all = |order: &mut dyn Iterator<Item = usize>| {
        let first = order.next().expect("24 hours");
        let mut day = hours[first].clone();
        for hour in order {
            day.merge(&hours[hour]).expect("hours of one profile merge");
        }
        day
    };
    let forward = merge_all(&mut (0..24));
    let backward = merge_all(&mut (0..24).rev());
    let interleaved = merge_all(&mut (0..24).map(|i| (i * 7) % 24));
    for day in [&backward, &interleaved] {
        for (ours, theirs) in forward.features.iter().zip(&day.features) {
            assert_same_data(ours, theirs, 20.0);
        }
        assert_eq!(forward.classes, day.classes);
        assert_eq!(forward.latency_us, day.latency_us);
    }
    assert_eq!(
        (forward.window_start, forward.window_end),
        (NOW, NOW + 24 * 3_600)
    );
    assert_eq!(forward.validate(&profile, &hash), Ok(()));
}

/// Acceptance 3: the summary core is at most 128 bytes per feature.
#[test]
fn a_hundred_feature_summary_encodes_within_16_kib() {
    let profile = drift_profile_with(100, 5_000);
    assert!(profile
        .features
        .iter()
        .all(|feature| feature.edges.len() == PROFILE_EDGES));
    let mut summary = drift_summary_of(&profile, 1_000, 0, 3);
    summary.classes.clear();
    let mut bare = summary.clone();
    bare.features.clear();
    let frame = encode(&summary).expect("summary encodes");
    let overhead = encode(&bare).expect("empty summary encodes").len();
    let per_feature = (frame.len() - overhead) / 100;
    println!(
        "100-feature summary: {} bytes, {per_feature} bytes per feature",
        frame.len()
    );
    assert!(frame.len() <= 16 * 1024, "{} bytes", frame.len());
    assert!(per_feature <= 128, "{per_feature} bytes per feature");
}

/// Acceptance 4: windows from the reference distribution are rarely flagged; a half-sigma shift
/// almost always is. 100 features in 10 groups of ten; the features of a group share one
/// distribution and its profile (built from 100,000 reference values), and every feature-window is
/// drawn independently.
#[test]
fn the_flag_rule_holds_its_false_positive_rate_and_catches_a_half_sigma_shift() {
    const FEATURES: usize = 100;
    const DISTRIBUTIONS: usize = 10;
    const WINDOWS: usize = 100;
    const SHIFTED_FEATURES: usize = 20;
    const N: usize = 1_000;
    let profile = drift_profile_with(DISTRIBUTIONS, 100_000);
    let mut rng = SplitMix::new(42);
    let mut flagged = |features: usize, shift: f64| {
        let mut count = 0;
        for _ in 0..WINDOWS {
            for index in (0..features).map(|feature| feature % DISTRIBUTIONS) {
                let feature = &profile.features[index];
                let values = to_f32(&feature_values(&mut rng, index, N, shift));
                let current = summarise(&values, &feature.edges);
                let drift = assess_feature(feature, &current, &profile.thresholds);
                count += usize::from(drift.status != DriftStatus::Ok);
            }
        }
        count
    };
    let false_alarms = flagged(FEATURES, 0.0);
    let detections = flagged(SHIFTED_FEATURES, 0.5);
    let (unshifted, shifted) = (FEATURES * WINDOWS, SHIFTED_FEATURES * WINDOWS);
    println!("flagged: {false_alarms} of {unshifted} unshifted, {detections} of {shifted} shifted");
    assert!(
        false_alarms * 100 <= 5 * unshifted,
        "{false_alarms} of {unshifted} windows from the reference flagged"
    );
    assert!(
        detections * 100 >= 95 * shifted,
        "only {detections} of {shifted} half-sigma shifts flagged"
    );
}

/// A device that serves a few requests an hour sends small windows, and a quiet label group's
/// hour merges few. Windows of 15 to 200 values drawn from the reference distribution itself are
/// flagged for their distribution about as often as the thresholds' confidence allows (5%; at
/// most 8% of 400 windows, three standard deviations of chance), and a one-sigma shift still is,
/// from 50 values on. Before the homogeneity test, PSI's `EPSILON` for a bin a small window left
/// empty (about 0.3 for a nineteenth of the reference) flagged 397 of 400 windows of 15. Class
/// outputs likewise. Values past the reference's range are left to their own rule here.
#[test]
fn small_windows_from_the_reference_are_rarely_flagged_and_a_shift_still_is() {
    const WINDOWS: usize = 400;
    const MOST: usize = WINDOWS * 8 / 100;
    let profile = drift_profile_with(6, 1_000);
    let thresholds = Thresholds::default();
    let mut rng = SplitMix::new(0x5a11);
    // Flagged for its distribution; the status says so too whenever no quality issue raises it.
    let by_distribution = |drift: &FeatureDrift| {
        let flagged = drift.significant && drift.value >= drift.threshold;
        if drift.quality.is_empty() {
            assert_eq!(drift.status != DriftStatus::Ok, flagged, "{drift:?}");
        }
        flagged
    };
    let mut flagged = |index: usize, n: usize, shift: f64| {
        let feature = &profile.features[index];
        (0..WINDOWS)
            .filter(|_| {
                let values = to_f32(&feature_values(&mut rng, index, n, shift));
                let current = summarise(&values, &feature.edges);
                by_distribution(&assess_feature(feature, &current, &thresholds))
            })
            .count()
    };
    for n in [15, 30, 50, 100, 200] {
        for index in 0..profile.features.len() {
            let false_alarms = flagged(index, n, 0.0);
            assert!(
                false_alarms <= MOST,
                "{false_alarms} of {WINDOWS} windows of {n} values from feature {index}'s \
                 reference flagged"
            );
        }
    }
    for n in [50, 100, 200] {
        let detections = flagged(0, n, 1.0);
        assert!(
            detections * 100 >= 95 * WINDOWS,
            "only {detections} of {WINDOWS} one-sigma shifts of {n} values flagged"
        );
    }

    let argmax = &profile.classes[0];
    let mut outputs = |weights: &[u64], n: usize| {
        (0..WINDOWS)
            .filter(|_| {
                let mut current = ClassSummary::new(argmax.classes.len());
                for _ in 0..n {
                    let (class, confidence) = draw_class(&mut rng, weights);
                    current.observe(class, Some(confidence), &argmax.classes);
                }
                by_distribution(&assess_class(argmax, &current, &thresholds))
            })
            .count()
    };
    for n in [5, 20, 50] {
        let false_alarms = outputs(&ARGMAX_WEIGHTS, n);
        assert!(
            false_alarms <= MOST,
            "{false_alarms} of {WINDOWS} windows of {n} outputs as the reference's flagged"
        );
    }
    let flipped = outputs(&[5, 10, 20, 25, 40], 50);
    assert!(
        flipped * 100 >= 95 * WINDOWS,
        "only {flipped} of {WINDOWS} flipped windows of 50 outputs flagged"
    );
}

/// Acceptance 5: NaN, ±inf, nulls, out-of-range values and unseen classes are counted apart and
/// never enter the bins.
#[test]
fn non_finite_null_out_of_range_and_unseen_values_are_counted_apart() {
    let edges = [0.0, 1.0, 2.0, 3.0];
    let values = [
        0.5,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -1.0,
        4.0,
        3.0,
        0.0,
        1.0,
        f64::NAN,
    ];
    let mut one_by_one = FeatureSummary::new(&edges);
    for value in values {
        one_by_one.observe(value, &edges);
    }
    let batch = summarise(&to_f32(&values), &edges);
    for mut summary in [one_by_one, batch] {
        summary.observe_null();
        summary.observe_null();
        assert_eq!(
            (
                summary.n,
                summary.nan,
                summary.pos_inf,
                summary.neg_inf,
                summary.null
            ),
            (6, 2, 1, 1, 2)
        );
        assert_eq!((summary.below, summary.above), (1, 1));
        assert_eq!(summary.bins, [2, 1, 1]);
        assert_eq!(summary.metric_bins(), [1, 2, 1, 1, 1]);
        assert_eq!((summary.min, summary.max, summary.sum), (-1.0, 4.0, 7.5));
        assert_eq!(summary.check(&edges), Ok(()));
    }

    let classes = [0, 1, 2];
    let mut outputs = ClassSummary::new(classes.len());
    outputs.observe(1, Some(0.93), &classes);
    outputs.observe(5, Some(0.42), &classes);
    outputs.observe(-1, None, &classes);
    outputs.observe(2, Some(f32::NAN), &classes);
    assert_eq!(outputs.counts, [0, 1, 1]);
    assert_eq!(outputs.unseen, 2);
    let mut confidence = [0; CONFIDENCE_BINS];
    confidence[9] = 1;
    confidence[4] = 1;
    assert_eq!(outputs.confidence, confidence);
    assert_eq!(outputs.metric_bins(), [0, 1, 1, 2]);
    assert_eq!(outputs.check(classes.len()), Ok(()));
}

#[test]
fn quality_issues_are_reported_and_raise_the_status() {
    let profile = drift_profile_with(1, 10_000);
    let feature = &profile.features[0];
    let thresholds = &profile.thresholds;
    let mut rng = SplitMix::new(5);
    let mut current = summarise(
        &to_f32(&feature_values(&mut rng, 0, 1_000, 0.0)),
        &feature.edges,
    );
    let clean = assess_feature(feature, &current, thresholds);
    assert_eq!(
        (clean.status, clean.quality.clone()),
        (DriftStatus::Ok, vec![])
    );
    assert_eq!(
        (clean.kind.as_str(), clean.metric.as_str()),
        (NUMERIC_KIND, "psi")
    );

    let (low, high) = (feature.edges[0], feature.edges[PROFILE_EDGES - 1]);
    for value in [f64::NAN, f64::INFINITY, low - 1.0, high + 1.0] {
        current.observe(value, &feature.edges);
    }
    current.observe_null();
    let drift = assess_feature(feature, &current, thresholds);
    assert_eq!(drift.status, DriftStatus::Warn);
    assert_eq!(
        drift.quality[..3],
        [
            QualityIssue::Nan { count: 1 },
            QualityIssue::Infinite { count: 1 },
            QualityIssue::OutOfRange { below: 1, above: 1 },
        ]
    );
    let QualityIssue::Missing {
        share,
        reference_share,
    } = drift.quality[3]
    else {
        panic!("expected a missing-share issue, got {:?}", drift.quality);
    };
    assert_close(share, 2.0 / 1_005.0, 1e-15, "missing share");
    assert_eq!(reference_share, 0.0);

    let labels = &profile.classes[1];
    let mut outputs = ClassSummary::new(labels.classes.len());
    for label in [-1, 3, 7, 3, -1, 7, 99] {
        outputs.observe(label, None, &labels.classes);
    }
    let drift = assess_class(labels, &outputs, thresholds);
    assert_eq!(drift.quality, [QualityIssue::Unseen { count: 1 }]);
    assert!(drift.status >= DriftStatus::Warn);
}

#[test]
fn out_of_range_values_are_an_issue_only_beyond_what_chance_allows() {
    let profile = drift_profile_with(1, 100_000);
    let feature = &profile.features[0];
    let mut current = FeatureSummary::new(&feature.edges);
    let (mean, _) = feature_distribution(0);
    // A million values from the reference distribution would put about 20 outside a 100,000
    // value reference's range: 25 of them is no news, 60 is.
    current.observe_f32(&vec![mean as f32; 1_000_000 - 25], &feature.edges);
    for _ in 0..25 {
        current.observe(feature.edges[PROFILE_EDGES - 1] + 1.0, &feature.edges);
    }
    let quality =
        |current: &FeatureSummary| assess_feature(feature, current, &profile.thresholds).quality;
    assert_eq!(quality(&current), []);
    for _ in 0..35 {
        current.observe(feature.edges[0] - 1.0, &feature.edges);
    }
    assert_eq!(
        quality(&current),
        [QualityIssue::OutOfRange {
            below: 35,
            above: 25
        }]
    );
}

#[test]
fn statuses_follow_the_flag_rules() {
    let profile = drift_profile_with(1, 50_000);
    let feature = &profile.features[0];
    let thresholds = Thresholds::default();
    let mut rng = SplitMix::new(11);
    let judged = |shift: f64, n: usize, rng: &mut SplitMix| {
        let values = to_f32(&feature_values(rng, 0, n, shift));
        assess_feature(feature, &summarise(&values, &feature.edges), &thresholds)
    };
    let nothing = assess_feature(feature, &FeatureSummary::new(&feature.edges), &thresholds);
    assert_eq!(
        (nothing.status, nothing.value, nothing.n, nothing.threshold),
        (DriftStatus::Ok, 0.0, 0, thresholds.psi_warn)
    );
    let small = judged(0.0, 50, &mut rng);
    let expected = chi_square_quantile(PROFILE_EDGES as u64, 0.95) / 50.0;
    assert_close(small.threshold, expected, 1e-12, "small-sample threshold");
    let big = judged(0.0, 20_000, &mut rng);
    assert_eq!(
        (big.threshold, big.status),
        (thresholds.psi_warn, DriftStatus::Ok)
    );
    let shifted = judged(0.4, 20_000, &mut rng);
    assert_eq!(shifted.status, DriftStatus::Warn, "psi {}", shifted.psi);
    let far = judged(1.5, 20_000, &mut rng);
    assert_eq!(far.status, DriftStatus::Alert, "psi {}", far.psi);
    for drift in [&shifted, &far] {
        assert_eq!(drift.value, drift.psi);
        assert!(drift.psi >= drift.threshold);
    }

    let argmax = &profile.classes[0];
    let outputs = |weights: &[u64], n: usize, rng: &mut SplitMix| {
        let mut outputs = ClassSummary::new(argmax.classes.len());
        for _ in 0..n {
            let (class, confidence) = draw_class(rng, weights);
            outputs.observe(class, Some(confidence), &argmax.classes);
        }
        assess_class(argmax, &outputs, &thresholds)
    };
    let same = outputs(&ARGMAX_WEIGHTS, 5_000, &mut rng);
    assert_eq!(
        (same.status, same.kind.as_str(), same.metric.as_str()),
        (DriftStatus::Ok, CLASS_KIND, "js")
    );
    let tilted = outputs(&[25, 25, 20, 15, 15], 5_000, &mut rng);
    assert_eq!(tilted.status, DriftStatus::Warn, "js {}", tilted.js);
    let flipped = outputs(&[5, 10, 20, 25, 40], 5_000, &mut rng);
    assert_eq!(flipped.status, DriftStatus::Alert, "js {}", flipped.js);
    // A handful of outputs cannot show a distribution: the threshold rises above js_flag.
    let few = outputs(&ARGMAX_WEIGHTS, 20, &mut rng);
    assert!(few.threshold > thresholds.js_flag, "{}", few.threshold);
}

#[test]
fn assess_lists_every_feature_most_severe_first() {
    let profile = drift_profile_with(6, 20_000);
    let hash = profile_sha256(&profile);
    let mut summary = DriftSummary::new("keyword-spotter", 7, hash, &profile, NOW, NOW + 3_600);
    let mut rng = SplitMix::new(21);
    for (index, (feature, current)) in profile
        .features
        .iter()
        .zip(&mut summary.features)
        .enumerate()
    {
        let shift = [0.0, 2.0, 0.0, 0.4, 0.0, 0.0][index];
        current.observe_f32(
            &to_f32(&feature_values(&mut rng, index, 5_000, shift)),
            &feature.edges,
        );
    }
    assert_eq!(summary.validate(&profile, &hash), Ok(()));
    let drifts = assess(&profile, &summary);
    assert_eq!(drifts.len(), 8);
    let names: Vec<&str> = drifts
        .iter()
        .take(2)
        .map(|drift| drift.name.as_str())
        .collect();
    assert_eq!(names, ["image.mean[0]", "wide.mean[0..128]"]);
    assert_eq!(drifts[0].status, DriftStatus::Alert);
    assert_eq!(drifts[1].status, DriftStatus::Warn);
    // Each verdict carries the histograms its figures come from.
    for drift in &drifts {
        assert_eq!(
            outpost_protocol::drift::psi(&drift.reference_bins, &drift.current_bins),
            drift.psi
        );
    }
    assert_eq!(drifts[0].edges, profile.features[1].edges);
    assert_eq!(
        drifts[0].reference_bins,
        profile.features[1].reference.metric_bins()
    );
    assert_eq!(drifts[0].current_bins, summary.features[1].metric_bins());
    for pair in drifts.windows(2) {
        assert!(
            (pair[0].status, pair[0].value) >= (pair[1].status, pair[1].value),
            "{:?} before {:?}",
            (pair[0].status, pair[0].value),
            (pair[1].status, pair[1].value)
        );
    }
}

#[test]
fn profile_and_summary_round_trip() {
    let profile = drift_profile();
    assert_eq!(profile.check(), Ok(()));
    let frame = encode(&profile).expect("profile encodes");
    assert_eq!(decode::<Profile>(&frame), Ok(profile.clone()));
    let summary = drift_summary();
    assert_eq!(
        summary.validate(&profile, &profile_sha256(&profile)),
        Ok(())
    );
    let frame = encode(&summary).expect("summary encodes");
    let decoded: DriftSummary = decode(&frame).expect("summary decodes");
    assert_eq!(decoded, summary);
    assert_eq!(encode(&decoded).expect("summary re-encodes"), frame);
}

// Acceptance 7: hostile summaries are refused with an error saying what is wrong.

/// A valid summary, its profile and the profile's hash.
fn valid() -> (DriftSummary, Profile, Sha256) {
    let profile = drift_profile();
    let hash = profile_sha256(&profile);
    let summary = drift_summary_of(&profile, 200, 0, 7);
    assert_eq!(summary.validate(&profile, &hash), Ok(()));
    (summary, profile, hash)
}

/// Validates `summary` after `tamper` changed it.
fn validate_tampered(tamper: impl FnOnce(&mut DriftSummary)) -> Result<(), DriftError> {
    let (mut summary, profile, hash) = valid();
    tamper(&mut summary);
    summary.validate(&profile, &hash)
}

/// The error of feature `index` (named as in the sample profile) wrapping `source`.
fn in_feature(index: usize, source: DriftError) -> DriftError {
    let name = drift_profile().features[index].name.clone();
    DriftError::Feature {
        index,
        name,
        source: Box::new(source),
    }
}

#[test]
fn validate_refuses_a_summary_of_another_profile() {
    let (summary, profile, hash) = valid();
    let other = Sha256([0x77; 32]);
    assert_eq!(
        summary.validate(&profile, &other),
        Err(DriftError::ProfileMismatch {
            expected: other,
            found: hash
        })
    );
}

#[test]
fn validate_refuses_counts_that_do_not_add_up() {
    assert_eq!(
        validate_tampered(|summary| summary.features[1].bins[4] += 1),
        Err(in_feature(
            1,
            DriftError::CountMismatch {
                n: 200,
                binned: 201
            }
        ))
    );
    assert_eq!(
        validate_tampered(|summary| summary.features[2].n = 150),
        Err(in_feature(
            2,
            DriftError::CountMismatch {
                n: 150,
                binned: 200
            }
        ))
    );
    let overflow = validate_tampered(|summary| {
        summary.features[0].bins[0] = u64::MAX;
        summary.features[0].n = u64::MAX;
    });
    assert_eq!(overflow, Err(in_feature(0, DriftError::CountOverflow)));
    // Counts that add up but disagree with min and max: a value below the first edge with none
    // counted below, made one way or the other depending on how the sample fell.
    let error = validate_tampered(|summary| {
        let feature = &mut summary.features[3];
        if feature.below == 0 {
            feature.min -= 1_000.0;
        } else {
            feature.bins[0] += feature.below;
            feature.below = 0;
        }
    })
    .unwrap_err();
    assert!(
        matches!(&error, DriftError::Feature { index: 3, source, .. }
            if matches!(**source, DriftError::ExtentsMismatch { below: 0, .. })),
        "{error}"
    );
    let error = validate_tampered(|summary| summary.classes[0].confidence[9] += 10_000);
    assert!(
        matches!(&error, Err(DriftError::Class { index: 0, source, .. })
            if matches!(**source, DriftError::ConfidenceExcess { .. })),
        "{error:?}"
    );
}

#[test]
fn validate_refuses_non_finite_or_impossible_moments() {
    for (moment, tamper) in [
        (
            "sum",
            (|s: &mut FeatureSummary| s.sum = f64::NAN) as fn(&mut FeatureSummary),
        ),
        ("mean", |s| s.mean = f64::NAN),
        ("m2", |s| s.m2 = f64::INFINITY),
        ("min", |s| s.min = f64::NEG_INFINITY),
        ("max", |s| s.max = f64::NAN),
    ] {
        let error = validate_tampered(|summary| tamper(&mut summary.features[0])).unwrap_err();
        let DriftError::Feature {
            index: 0, source, ..
        } = &error
        else {
            panic!("{moment}: {error}");
        };
        assert!(
            matches!(**source, DriftError::NonFinite { moment: m, .. } if m == moment),
            "{moment}: {error}"
        );
        assert!(error.to_string().contains("not finite"), "{error}");
    }
    let negative = validate_tampered(|summary| summary.features[0].m2 = -1.0);
    assert_eq!(
        negative,
        Err(in_feature(0, DriftError::NegativeM2 { m2: -1.0 }))
    );
    let error = validate_tampered(|summary| summary.features[0].mean = 1e9).unwrap_err();
    assert!(error.to_string().contains("lies outside"), "{error}");
    let error = validate_tampered(|summary| {
        let feature = &mut summary.features[0];
        std::mem::swap(&mut feature.min, &mut feature.max);
    })
    .unwrap_err();
    assert!(error.to_string().contains("is above max"), "{error}");
    // An empty summary has no moments to speak of.
    let error = validate_tampered(|summary| {
        let edges = drift_profile().features[0].edges.clone();
        summary.features[0] = FeatureSummary::new(&edges);
        summary.features[0].sum = 3.0;
    })
    .unwrap_err();
    assert_eq!(
        error,
        in_feature(
            0,
            DriftError::EmptyMoments {
                moment: "sum",
                value: 3.0
            }
        )
    );
}

#[test]
fn validate_refuses_wrong_lengths() {
    assert_eq!(
        validate_tampered(|summary| {
            summary.features.pop();
        }),
        Err(DriftError::FeatureCount {
            expected: 4,
            found: 3
        })
    );
    assert_eq!(
        validate_tampered(|summary| summary.classes.push(ClassSummary::new(2))),
        Err(DriftError::ClassCount {
            expected: 2,
            found: 3
        })
    );
    assert_eq!(
        validate_tampered(|summary| summary.latency_us.push(0)),
        Err(DriftError::LatencyBuckets {
            expected: 17,
            found: 18
        })
    );
    assert_eq!(
        validate_tampered(|summary| summary.features[2].bins.push(0)),
        Err(in_feature(
            2,
            DriftError::BinCount {
                expected: PROFILE_EDGES - 1,
                found: PROFILE_EDGES
            }
        ))
    );
    let error = validate_tampered(|summary| summary.classes[1].counts.clear()).unwrap_err();
    assert_eq!(
        error.to_string(),
        "class output 1 (\"label\"): 0 class counts, expected 3"
    );
    let error = validate_tampered(|summary| {
        summary.classes[0].confidence.pop();
    })
    .unwrap_err();
    assert!(
        error
            .to_string()
            .ends_with("9 confidence bins, expected 10"),
        "{error}"
    );
}

#[test]
fn validate_refuses_bad_windows_and_model_names() {
    assert_eq!(
        validate_tampered(|summary| summary.window_start += 60),
        Err(DriftError::WindowUnaligned {
            start: NOW + 60,
            end: NOW + 3_600
        })
    );
    assert_eq!(
        validate_tampered(|summary| summary.window_end = summary.window_start),
        Err(DriftError::WindowEmpty {
            start: NOW,
            end: NOW
        })
    );
    assert_eq!(
        validate_tampered(|summary| summary.window_end = NOW + MAX_WINDOW_SECS + 3_600),
        Err(DriftError::WindowTooLong {
            start: NOW,
            end: NOW + MAX_WINDOW_SECS + 3_600,
            max: MAX_WINDOW_SECS
        })
    );
    assert!(validate_tampered(|summary| summary.window_end = NOW + MAX_WINDOW_SECS).is_ok());
    let error = validate_tampered(|summary| summary.model = "../etc".to_owned()).unwrap_err();
    assert!(matches!(error, DriftError::ModelName { .. }), "{error}");
}

#[test]
fn decode_refuses_oversized_frames_before_decoding() {
    let (summary, _, _) = valid();
    let mut frame = encode(&summary).expect("summary encodes");
    frame.resize(DriftSummary::MAX_FRAME + 1, 0);
    assert_eq!(
        decode::<DriftSummary>(&frame),
        Err(DecodeError {
            message: "drift summary",
            reason: DecodeReason::Oversized {
                len: DriftSummary::MAX_FRAME + 1,
                max: DriftSummary::MAX_FRAME
            }
        })
    );
    let garbage = vec![0xff; Profile::MAX_FRAME + 1];
    assert_eq!(
        decode::<Profile>(&garbage).map_err(|error| error.reason),
        Err(DecodeReason::Oversized {
            len: Profile::MAX_FRAME + 1,
            max: Profile::MAX_FRAME
        })
    );
}

#[test]
fn merge_refuses_summaries_that_do_not_belong_together_and_changes_nothing() {
    let (summary, profile, _) = valid();
    let mut ours = summary.clone();
    let mut other_profile = summary.clone();
    other_profile.profile_sha256 = Sha256([1; 32]);
    assert!(matches!(
        ours.merge(&other_profile),
        Err(DriftError::ProfileMismatch { .. })
    ));
    let mut other_version = summary.clone();
    other_version.version += 1;
    assert!(matches!(
        ours.merge(&other_version),
        Err(DriftError::ModelMismatch { .. })
    ));
    // A failure in the last feature must not leave the earlier ones merged.
    let mut overflowing = summary.clone();
    let last = overflowing.features.len() - 1;
    overflowing.features[last].null = u64::MAX;
    assert_eq!(
        ours.merge(&overflowing),
        Err(DriftError::Feature {
            index: last,
            name: String::new(),
            source: Box::new(DriftError::CountOverflow)
        })
    );
    assert_eq!(ours, summary);
    // Nor one in the latency histogram, checked after every feature and class.
    let mut overflowing = summary.clone();
    overflowing.latency_us[0] = u64::MAX;
    ours.latency_us[0] = 1;
    let before = ours.clone();
    assert_eq!(ours.merge(&overflowing), Err(DriftError::CountOverflow));
    assert_eq!(ours, before);
    ours = summary.clone();
    let mut shorter = summary.clone();
    shorter.features[0].bins.pop();
    assert_eq!(
        ours.features[0].merge(&shorter.features[0]),
        Err(DriftError::BinCount {
            expected: 19,
            found: 18
        })
    );
    assert_eq!(ours, summary);
    ours.merge(&summary).expect("a summary merges with itself");
    assert_eq!(ours.features[0].n, 2 * summary.features[0].n);
    assert_eq!(ours.validate(&profile, &profile_sha256(&profile)), Ok(()));
}

#[test]
fn profile_check_refuses_bad_edges_classes_and_thresholds() {
    let checked = |tamper: fn(&mut Profile)| {
        let mut profile = drift_profile();
        tamper(&mut profile);
        profile.check()
    };
    let feature_error = |error: Result<(), DriftError>| match error {
        Err(DriftError::Feature { source, .. }) => *source,
        other => panic!("expected a feature error, got {other:?}"),
    };
    assert_eq!(checked(|_| ()), Ok(()));
    assert_eq!(
        feature_error(checked(|p| p.features[0].edges.truncate(1))),
        DriftError::EdgeCount {
            found: 1,
            max: PROFILE_EDGES
        }
    );
    assert!(matches!(
        feature_error(checked(|p| p.features[1].edges[3] = f64::NAN)),
        DriftError::EdgeNotFinite { index: 3, value } if value.is_nan()
    ));
    assert!(matches!(
        feature_error(checked(|p| p.features[1].edges[3] = f64::INFINITY)),
        DriftError::EdgeNotFinite { index: 3, .. }
    ));
    assert_eq!(
        feature_error(checked(|p| p.features[2].edges[5] = p.features[2].edges[4])),
        DriftError::EdgesNotIncreasing {
            index: 5,
            value: drift_profile().features[2].edges[4]
        }
    );
    assert!(matches!(
        checked(|p| p.classes[1].classes = vec![7, 3, -1]),
        Err(DriftError::Class { index: 1, source, .. })
            if *source == DriftError::ClassesNotIncreasing { index: 1, value: 3 }
    ));
    assert_eq!(
        checked(|p| p.thresholds.psi_alert = 0.05),
        Err(DriftError::Threshold {
            name: "psi_alert",
            value: 0.05,
            rule: ">= psi_warn"
        })
    );
    assert!(matches!(
        checked(|p| p.thresholds.confidence = f64::NAN),
        Err(DriftError::Threshold {
            name: "confidence",
            ..
        })
    ));
    assert!(checked(|p| p.thresholds.missing_factor = 0.5).is_err());
    assert!(checked(|p| p.thresholds.js_flag = 0.0).is_err());
}

#[test]
fn quantile_edges_span_the_reference_and_survive_repeats() {
    let values: Vec<f64> = (0..=1_900).map(f64::from).collect();
    let edges = quantile_edges(&values);
    let expected: Vec<f64> = (0..PROFILE_EDGES).map(|i| i as f64 * 100.0).collect();
    assert_eq!(edges, expected);
    assert_eq!(quantile_edges(&[2.0, 1.0, 1.0, 1.0, 2.0]), [1.0, 2.0]);
    assert_eq!(
        quantile_edges(&[5.0, f64::NAN, 5.0]),
        [5.0, 5.0f64.next_up()]
    );
    assert_eq!(
        quantile_edges(&[f64::NAN, f64::INFINITY]),
        Vec::<f64>::new()
    );
    let error = NumericProfile::from_values(
        "empty",
        outpost_protocol::drift::TensorSide::Output,
        outpost_protocol::drift::FeatureSource::Column {
            tensor: "y".to_owned(),
            index: 0,
        },
        &[f64::NAN],
    );
    assert_eq!(
        error,
        Err(DriftError::NoFiniteReference {
            name: "empty".to_owned()
        })
    );
}

#[test]
fn class_profiles_with_label_sources_summarise_like_argmax_ones() {
    let profile = ClassProfile {
        name: "label".to_owned(),
        source: ClassSource::Label {
            tensor: "label".to_owned(),
        },
        classes: vec![-5, 0, 12],
        reference: ClassSummary {
            counts: vec![10, 10, 10],
            unseen: 0,
            confidence: vec![0; CONFIDENCE_BINS],
        },
    };
    assert_eq!(profile.check(), Ok(()));
    let mut current = ClassSummary::new(3);
    for label in [12, 12, 0, -5, -5, 0] {
        current.observe(label, None, &profile.classes);
    }
    assert_eq!(current.counts, [2, 2, 2]);
    let drift = assess_class(&profile, &current, &Thresholds::default());
    assert_eq!((drift.js, drift.psi, drift.n), (0.0, 0.0, 6));
}
