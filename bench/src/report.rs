//! Timing: variants interleaved call by call, and their min, p50 and p90.

use std::time::{Duration, Instant};

use outpost_model::example::SplitMix64;

/// Seed of the per-round variant order, so two runs time the same sequence.
const ORDER_SEED: u64 = 7;

/// One variant: a name for the table and one call to time.
pub type Variant<'a> = (&'a str, &'a dyn Fn() -> anyhow::Result<()>);

/// The timings of one variant, sorted.
#[derive(Debug)]
pub struct Timings {
    pub name: String,
    sorted: Vec<Duration>,
}

impl Timings {
    pub fn percentile(&self, p: f64) -> Duration {
        let rank = ((self.sorted.len() as f64 - 1.0) * p).round() as usize;
        self.sorted[rank.min(self.sorted.len() - 1)]
    }

    pub fn min(&self) -> Duration {
        self.sorted[0]
    }

    pub fn p50(&self) -> Duration {
        self.percentile(0.5)
    }
}

/// Runs every variant `rounds / 10` times (at least 5) to warm up, then times `rounds` rounds of
/// one call each, in a fresh shuffled order every round.
pub fn interleave(rounds: usize, variants: &[Variant]) -> anyhow::Result<Vec<Timings>> {
    for _ in 0..(rounds / 10).max(5) {
        for (_, run) in variants {
            run()?;
        }
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(rounds); variants.len()];
    let mut order: Vec<usize> = (0..variants.len()).collect();
    let mut rng = SplitMix64::new(ORDER_SEED);
    for _ in 0..rounds {
        // Shuffled every round, so every variant follows every other one about as often: a call
        // slowed by what ran just before it (the API's threads winding down, another plan's
        // weights in the caches) slows every variant alike. Rotating a fixed order by one each
        // round does not do that: it keeps the cyclic order, so the agent path always came right
        // after bare tract, which made it 1.3x bare tract on the Silero sequence export where a
        // shuffled order measures 1.03x.
        for slot in (1..order.len()).rev() {
            order.swap(slot, (rng.next_u64() % (slot as u64 + 1)) as usize);
        }
        for &index in &order {
            let started = Instant::now();
            (variants[index].1)()?;
            times[index].push(started.elapsed());
        }
    }
    Ok(timings(variants, times))
}

/// Each variant's times, sorted, under its name.
fn timings(variants: &[Variant], times: Vec<Vec<Duration>>) -> Vec<Timings> {
    variants
        .iter()
        .zip(times)
        .map(|((name, _), mut sorted)| {
            sorted.sort_unstable();
            Timings {
                name: (*name).to_owned(),
                sorted,
            }
        })
        .collect()
}

pub fn micros(duration: Duration) -> String {
    let us = duration.as_secs_f64() * 1e6;
    if us >= 10_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.1} µs")
    }
}

/// Prints a Markdown table: min, p50, p90 and each p50 over `base`'s p50.
pub fn print_table(timings: &[Timings], base: &Timings) {
    println!("| Variant | min | p50 | p90 | p50 ÷ {} |", base.name);
    println!("|---|---:|---:|---:|---:|");
    for timing in timings {
        println!(
            "| {} | {} | {} | {} | {:.2} |",
            timing.name,
            micros(timing.min()),
            micros(timing.p50()),
            micros(timing.percentile(0.9)),
            timing.p50().as_secs_f64() / base.p50().as_secs_f64()
        );
    }
}

/// Runs every variant `per_block` times to warm up, then `blocks` blocks of `per_block` calls of
/// one variant in a row, the variants' order shuffled each round of blocks, and times each call.
///
/// Back to back, a variant's threads stay hot and its caches warm, which is how a device's
/// application calls a model in a loop; [`interleave`] measures the opposite, every call after
/// another variant's. Blocks still alternate, so a slow spell of the machine slows every variant.
pub fn in_blocks(
    blocks: usize,
    per_block: usize,
    variants: &[Variant],
) -> anyhow::Result<Vec<Timings>> {
    for (_, run) in variants {
        for _ in 0..per_block {
            run()?;
        }
    }
    let mut times: Vec<Vec<Duration>> =
        vec![Vec::with_capacity(blocks * per_block); variants.len()];
    let mut order: Vec<usize> = (0..variants.len()).collect();
    let mut rng = SplitMix64::new(ORDER_SEED);
    for _ in 0..blocks {
        for slot in (1..order.len()).rev() {
            order.swap(slot, (rng.next_u64() % (slot as u64 + 1)) as usize);
        }
        for &index in &order {
            let run = variants[index].1;
            for _ in 0..per_block {
                let started = Instant::now();
                run()?;
                times[index].push(started.elapsed());
            }
        }
    }
    Ok(timings(variants, times))
}
