//! Fuzzes the full plan verification a device runs on a plan from the hub.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_protocol_fuzz::verify_plan(data));
