//! Fuzzes the full verification a device runs on a capture allowance from the hub.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_protocol_fuzz::verify_capture(data));
