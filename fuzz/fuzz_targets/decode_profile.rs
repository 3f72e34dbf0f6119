//! Fuzzes decoding of drift profiles, and use of those that pass their check.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_protocol_fuzz::decode_profile(data));
