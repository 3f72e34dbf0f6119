//! Fuzzes opening a sealed sample as `capture open` does with bytes from the hub.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_protocol_fuzz::open_sample(data));
