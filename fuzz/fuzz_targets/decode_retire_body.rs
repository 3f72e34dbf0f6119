//! Fuzzes decoding of retirement bodies (a signed retirement's payload).
#![no_main]
outpost_protocol_fuzz::fuzz_decode!(outpost_protocol::trust::RetireBody);
