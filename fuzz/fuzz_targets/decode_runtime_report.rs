//! Fuzzes decoding of runtime reports, which every device sends the hub, and the checks of their
//! caps the hub runs before storing one.
#![no_main]
libfuzzer_sys::fuzz_target!(|frame: &[u8]| outpost_protocol_fuzz::decode_runtime_report(frame));
