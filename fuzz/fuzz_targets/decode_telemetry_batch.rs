//! Fuzzes decoding of telemetry batches, the largest frame the hub decodes (1 MiB cap).
#![no_main]
outpost_protocol_fuzz::fuzz_decode!(outpost_protocol::device::TelemetryBatch);
