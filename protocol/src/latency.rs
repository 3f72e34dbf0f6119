//! The latency histogram's buckets, one layout for a telemetry window and a drift summary.
//!
//! Both `device` and `drift` count latencies in these buckets; keeping them here lets `device`
//! use `drift` without `drift` using `device` back. `device` re-exports the constant, so its
//! path `outpost_protocol::device::LATENCY_BUCKETS_US` is unchanged.

/// Upper bounds, in microseconds, of the latency histogram buckets; a last bucket counts the rest.
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];
