//! Fuzzes the CSV reader `outpost-hub profile` runs on an operator's reference dataset.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = outpost_protocol::dataset::parse_csv(data);
});
