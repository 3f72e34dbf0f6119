//! Fuzzes decoding of telemetry batches, the largest frame the hub decodes (1 MiB cap), and the
//! checks the hub runs on a decoded batch's shadow reports.
#![no_main]
libfuzzer_sys::fuzz_target!(|frame: &[u8]| outpost_protocol_fuzz::decode_telemetry_batch(frame));
