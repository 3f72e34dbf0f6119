//! Fuzzes decoding of validation sets, the largest frame a device decodes (64 MiB cap), in either
//! form: the current one and the first, still read.
#![no_main]
libfuzzer_sys::fuzz_target!(|frame: &[u8]| {
    // A refusal is the expected answer; only a panic, abort or timeout is a finding.
    let _ = outpost_protocol::device::ValidationSet::decode(frame);
});
