//! Fuzzes the full manifest verification a device runs on a manifest from the hub.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_protocol_fuzz::verify_manifest(data));
