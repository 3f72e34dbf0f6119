//! Fuzzes decoding of telemetry acks, decoded by a device.
#![no_main]
outpost_protocol_fuzz::fuzz_decode!(outpost_protocol::device::TelemetryAck);
