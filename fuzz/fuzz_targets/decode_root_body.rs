//! Fuzzes decoding of root payloads, decoded from inside a signed root.
#![no_main]
outpost_protocol_fuzz::fuzz_decode!(outpost_protocol::trust::RootBody);
