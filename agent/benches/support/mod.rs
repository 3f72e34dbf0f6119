//! The interleaved timing loop and the report the agent's latency benches share.

use std::time::{Duration, Instant};

/// One variant: a name for the table and one call to time.
pub type Variant<'a> = (&'a str, &'a dyn Fn() -> anyhow::Result<()>);

pub fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a whole number")),
        Err(_) => default,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn micros(duration: Duration) -> String {
    format!("{:.1} µs", duration.as_secs_f64() * 1e6)
}

/// Warms every variant up, then times `rounds` rounds of one call each, in order, and prints
/// min, p50, p99 and each p50's ratio to the first variant's as a Markdown table.
pub fn interleave(rounds: usize, variants: &[Variant]) -> anyhow::Result<()> {
    for _ in 0..rounds.div_ceil(10) {
        for (_, run) in variants {
            run()?;
        }
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(rounds); variants.len()];
    for _ in 0..rounds {
        for ((_, run), times) in variants.iter().zip(&mut times) {
            let started = Instant::now();
            run()?;
            times.push(started.elapsed());
        }
    }
    for times in &mut times {
        times.sort_unstable();
    }
    let base = percentile(&times[0], 0.5).as_secs_f64();
    println!("| Variant | min | p50 | p99 | p50 ÷ {} |", variants[0].0);
    println!("|---|---:|---:|---:|---:|");
    for ((name, _), times) in variants.iter().zip(&times) {
        let p50 = percentile(times, 0.5);
        println!(
            "| {name} | {} | {} | {} | {:.3} |",
            micros(times[0]),
            micros(p50),
            micros(percentile(times, 0.99)),
            p50.as_secs_f64() / base
        );
    }
    Ok(())
}

/// POSTs a KServe v2 JSON request and returns the decoded answer.
pub fn post_json(http: &ureq::Agent, url: &str, body: &[u8]) -> anyhow::Result<serde_json::Value> {
    let mut response = http
        .post(url)
        .header("content-type", "application/json")
        .send(body)?;
    Ok(serde_json::from_slice(&response.body_mut().read_to_vec()?)?)
}

/// POSTs a request in the binary tensor extension (`header_len` bytes of JSON, then raw tensors)
/// and returns the answer's bytes.
pub fn post_binary(
    http: &ureq::Agent,
    url: &str,
    header_len: usize,
    body: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let mut response = http
        .post(url)
        .header("content-type", "application/octet-stream")
        .header("inference-header-content-length", header_len.to_string())
        .send(body)?;
    Ok(response.body_mut().read_to_vec()?)
}
