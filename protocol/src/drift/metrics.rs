//! Distances between a reference histogram and a current one over the same bins, and the
//! chi-square quantile the flag rules scale with sample size.
//!
//! All metrics take count vectors of equal length (metric bins, see the [module docs](super)).
//! Counts become proportions `c_i / total`. PSI, Jensen–Shannon and chi-square take logarithms of
//! proportions or divide by them, so there each zero proportion is replaced by [`EPSILON`] first,
//! without renormalising; Hellinger and KS use plain proportions. If either histogram is empty the
//! metric is 0 (no evidence of drift); if the lengths differ it is NaN, which no threshold
//! comparison flags. [`homogeneity`] is the test the flag rules add to the distances.

use std::f64::consts::{LN_2, PI};

/// The proportion a zero count is given before a logarithm or division.
pub const EPSILON: f64 = 1e-4;

/// How zero proportions are treated.
#[derive(Debug, Clone, Copy)]
enum Zeros {
    /// Replaced by [`EPSILON`].
    Epsilon,
    Keep,
}

/// `counts` as proportions, or `None` when they total zero.
fn proportions(counts: &[u64], zeros: Zeros) -> Option<Vec<f64>> {
    let total: f64 = counts.iter().map(|count| *count as f64).sum();
    if total <= 0.0 {
        return None;
    }
    let share = |count: &u64| match (count, zeros) {
        (0, Zeros::Epsilon) => EPSILON,
        _ => *count as f64 / total,
    };
    Some(counts.iter().map(share).collect())
}

/// Applies `metric` to the proportions of both histograms, following the module's rules for
/// mismatched and empty histograms.
fn compare(
    reference: &[u64],
    current: &[u64],
    zeros: Zeros,
    metric: impl FnOnce(&[f64], &[f64]) -> f64,
) -> f64 {
    if reference.len() != current.len() {
        return f64::NAN;
    }
    match (proportions(reference, zeros), proportions(current, zeros)) {
        (Some(p), Some(q)) => metric(&p, &q),
        _ => 0.0,
    }
}

/// Population stability index: `Σ (q_i - p_i) ln(q_i / p_i)`, with `p` the reference and `q` the
/// current proportions (zeros as [`EPSILON`]).
pub fn psi(reference: &[u64], current: &[u64]) -> f64 {
    compare(reference, current, Zeros::Epsilon, |p, q| {
        p.iter().zip(q).map(|(p, q)| (q - p) * (q / p).ln()).sum()
    })
}

/// Jensen–Shannon distance: the square root of the JS divergence in bits (zeros as [`EPSILON`]),
/// so within [0, 1].
pub fn js_distance(reference: &[u64], current: &[u64]) -> f64 {
    compare(reference, current, Zeros::Epsilon, |p, q| {
        let divergence: f64 = p
            .iter()
            .zip(q)
            .map(|(p, q)| {
                let m = (p + q) / 2.0;
                (p * (p / m).ln() + q * (q / m).ln()) / 2.0
            })
            .sum();
        (divergence / LN_2).clamp(0.0, 1.0).sqrt()
    })
}

/// Hellinger distance, `sqrt(Σ (√p_i - √q_i)² / 2)`, within [0, 1].
pub fn hellinger(reference: &[u64], current: &[u64]) -> f64 {
    compare(reference, current, Zeros::Keep, |p, q| {
        let squared: f64 = p
            .iter()
            .zip(q)
            .map(|(p, q)| (p.sqrt() - q.sqrt()).powi(2))
            .sum();
        (squared / 2.0).sqrt().min(1.0)
    })
}

/// Pearson's statistic of the current counts against those expected from the reference
/// proportions (zeros as [`EPSILON`]): `Σ (c_i - n p_i)² / (n p_i)`, `n` the current total.
pub fn chi_square(reference: &[u64], current: &[u64]) -> f64 {
    let n: f64 = current.iter().map(|count| *count as f64).sum();
    compare(reference, current, Zeros::Epsilon, |p, _| {
        p.iter()
            .zip(current)
            .map(|(p, count)| {
                let expected = n * p;
                (*count as f64 - expected).powi(2) / expected
            })
            .sum()
    })
}

/// Pearson's chi-square test of homogeneity between two histograms over the same bins: the
/// statistic of their 2 × B table of counts, `Σ (observed - expected)² / expected` with each
/// count expected in proportion to its histogram's total and its bin's, over the bins where
/// either has a count, and its degrees of freedom (those bins less one). Unlike [`chi_square`],
/// it needs no [`EPSILON`]: a bin the current histogram left empty adds what the counts expected
/// there, so small samples are judged at their size, and the reference's own sampling is counted.
/// Either histogram empty gives `(0.0, 0)`; lengths that differ give NaN.
pub fn homogeneity(reference: &[u64], current: &[u64]) -> (f64, u64) {
    if reference.len() != current.len() {
        return (f64::NAN, 0);
    }
    let total = |bins: &[u64]| bins.iter().map(|count| *count as f64).sum::<f64>();
    let (m, n) = (total(reference), total(current));
    if m <= 0.0 || n <= 0.0 {
        return (0.0, 0);
    }
    let mut statistic = 0.0;
    let mut filled = 0u64;
    for (r, c) in reference.iter().zip(current) {
        let bin = *r as f64 + *c as f64;
        if bin <= 0.0 {
            continue;
        }
        filled += 1;
        for (count, side) in [(*r as f64, m), (*c as f64, n)] {
            let expected = side * bin / (m + n);
            statistic += (count - expected).powi(2) / expected;
        }
    }
    (statistic, filled.saturating_sub(1))
}

/// Kolmogorov–Smirnov statistic on binned data: the largest difference between the two cumulative
/// distributions at the bin boundaries.
pub fn ks_from_bins(reference: &[u64], current: &[u64]) -> f64 {
    compare(reference, current, Zeros::Keep, |p, q| {
        let (mut cumulative_p, mut cumulative_q, mut largest) = (0.0, 0.0, 0.0f64);
        for (p, q) in p.iter().zip(q) {
            cumulative_p += p;
            cumulative_q += q;
            largest = largest.max((cumulative_p - cumulative_q).abs());
        }
        largest
    })
}

/// Newton steps (each guarded by a bisection bracket) before giving up on more precision.
const QUANTILE_ITERATIONS: usize = 200;
/// Series and continued-fraction terms before the incomplete gamma gives up on more precision;
/// enough for a shape of 10^6.
const GAMMA_ITERATIONS: usize = 100_000;

/// The `p` quantile of the chi-square distribution with `dof` degrees of freedom: the `x` with
/// `P(dof/2, x/2) = p`, `P` the regularised lower incomplete gamma function. Found by Newton's
/// method from the Wilson–Hilferty approximation, kept inside a bisection bracket; accurate to
/// about 1e-12 relative. `dof == 0` or `p <= 0` gives 0, `p >= 1` gives +inf, NaN gives NaN.
pub fn chi_square_quantile(dof: u64, p: f64) -> f64 {
    if p.is_nan() {
        return f64::NAN;
    }
    if dof == 0 || p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    let k = dof as f64;
    // The bracket starts unbounded above and closes as the iterates land on either side.
    let (mut low, mut high) = (0.0, f64::INFINITY);
    let guess = wilson_hilferty(k, p);
    let mut x = if guess > 0.0 && guess.is_finite() {
        guess
    } else {
        k
    };
    for _ in 0..QUANTILE_ITERATIONS {
        let error = cdf_excess(k, x, p);
        if error < 0.0 {
            low = x;
        } else {
            high = x;
        }
        let newton = x - error / chi_square_pdf(k, x);
        let next = if newton > low && newton < high {
            newton
        } else if high.is_finite() {
            (low + high) / 2.0
        } else {
            2.0 * x
        };
        if (next - x).abs() <= 1e-14 * x {
            return next;
        }
        x = next;
    }
    x
}

/// Wilson and Hilferty's cube-root normal approximation of the quantile.
fn wilson_hilferty(k: f64, p: f64) -> f64 {
    let z = normal_quantile(p);
    let c = 2.0 / (9.0 * k);
    k * (1.0 - c + z * c.sqrt()).powi(3)
}

/// The standard normal quantile by Abramowitz & Stegun 26.2.23 (error below 5e-4): only a starting
/// point for Newton's method.
fn normal_quantile(p: f64) -> f64 {
    let tail = p.min(1.0 - p);
    let t = (-2.0 * tail.ln()).sqrt();
    let z = t
        - (2.515517 + 0.802853 * t + 0.010328 * t * t)
            / (1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t);
    if p < 0.5 {
        -z
    } else {
        z
    }
}

/// `CDF(x) - p` for the chi-square distribution with `k` degrees of freedom. In the upper half it
/// is computed as `(1 - p) - Q(x)` from the upper tail directly, so a quantile near 1 keeps its
/// precision instead of drowning in `1 - Q` rounding.
fn cdf_excess(k: f64, x: f64, p: f64) -> f64 {
    let (lower, upper) = regularized_gamma(k / 2.0, x / 2.0);
    if p <= 0.5 {
        lower - p
    } else {
        (1.0 - p) - upper
    }
}

fn chi_square_pdf(k: f64, x: f64) -> f64 {
    let a = k / 2.0;
    ((a - 1.0) * x.ln() - x / 2.0 - a * LN_2 - ln_gamma(a)).exp()
}

/// `(P(a, x), Q(a, x))`, the regularised lower and upper incomplete gamma functions, for `a > 0`.
/// Below `x = a + 1` the series gives `P` and `Q = 1 - P`; above, the continued fraction gives `Q`
/// and `P = 1 - Q` (Numerical Recipes §6.2). Each way the smaller, tail value is computed directly.
fn regularized_gamma(a: f64, x: f64) -> (f64, f64) {
    if x <= 0.0 {
        return (0.0, 1.0);
    }
    let prefactor = (a * x.ln() - x - ln_gamma(a)).exp();
    if x < a + 1.0 {
        let lower = (prefactor * gamma_series(a, x)).min(1.0);
        (lower, 1.0 - lower)
    } else {
        let upper = (prefactor * gamma_continued_fraction(a, x)).min(1.0);
        (1.0 - upper, upper)
    }
}

/// `Σ x^n / (a (a+1) ... (a+n))`.
fn gamma_series(a: f64, x: f64) -> f64 {
    let (mut term, mut sum, mut denominator) = (1.0 / a, 1.0 / a, a);
    for _ in 0..GAMMA_ITERATIONS {
        denominator += 1.0;
        term *= x / denominator;
        sum += term;
        if term.abs() < sum.abs() * f64::EPSILON {
            break;
        }
    }
    sum
}

/// The continued fraction for `Γ(a, x) e^x x^-a`, by the modified Lentz method.
fn gamma_continued_fraction(a: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut b = x + 1.0 - a;
    let mut c = 1.0 / TINY;
    let mut d = 1.0 / b;
    let mut fraction = d;
    for i in 1..=GAMMA_ITERATIONS {
        let i = i as f64;
        let an = -i * (i - a);
        b += 2.0;
        d = an * d + b;
        if d.abs() < TINY {
            d = TINY;
        }
        c = b + an / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let step = d * c;
        fraction *= step;
        if (step - 1.0).abs() < f64::EPSILON {
            break;
        }
    }
    fraction
}

/// Lanczos coefficients for g = 7, n = 9.
const LANCZOS: [f64; 9] = [
    0.999_999_999_999_809_9,
    676.520_368_121_885_1,
    -1_259.139_216_722_402_8,
    771.323_428_777_653_1,
    -176.615_029_162_140_6,
    12.507_343_278_686_905,
    -0.138_571_095_265_720_12,
    9.984_369_578_019_572e-6,
    1.505_632_735_149_311_6e-7,
];

/// `ln Γ(a)` for `a >= 0.5` (half the degrees of freedom is never less), by Lanczos'
/// approximation; relative error around 1e-15.
fn ln_gamma(a: f64) -> f64 {
    let x = a - 1.0;
    let series = LANCZOS
        .iter()
        .enumerate()
        .skip(1)
        .fold(LANCZOS[0], |sum, (i, c)| sum + c / (x + i as f64));
    let t = x + 7.5;
    0.5 * (2.0 * PI).ln() + (x + 0.5) * t.ln() - t + series.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_gamma_matches_factorials_and_half_integers() {
        for (a, expected) in [
            (1.0, 0.0f64),
            (2.0, 0.0),
            (5.0, 24.0f64.ln()),
            (0.5, PI.sqrt().ln()),
            (10.5, 13.940_625_219_403_763),
        ] {
            let got = ln_gamma(a);
            assert!((got - expected).abs() < 1e-9, "ln_gamma({a}) = {got}");
        }
    }

    #[test]
    fn lower_gamma_of_shape_one_is_one_minus_exp() {
        for x in [0.01f64, 0.5, 1.0, 2.0, 10.0, 40.0] {
            let expected = 1.0 - (-x).exp();
            let (got, upper) = regularized_gamma(1.0, x);
            assert!((upper - (-x).exp()).abs() < 1e-14, "Q(1, {x}) = {upper}");
            assert!((got - expected).abs() < 1e-14, "P(1, {x}) = {got}");
        }
    }
}
