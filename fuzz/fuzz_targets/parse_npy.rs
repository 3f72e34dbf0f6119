//! Fuzzes the `.npy` reader `outpost-hub profile` runs on an operator's reference tensors.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(array) = outpost_protocol::dataset::parse_npy(data) {
        let _ = array.to_f64();
    }
});
