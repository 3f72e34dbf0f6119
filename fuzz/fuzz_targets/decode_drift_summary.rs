//! Fuzzes decoding and validation of drift summaries, which every device uploads to the hub.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_protocol_fuzz::decode_drift_summary(data));
