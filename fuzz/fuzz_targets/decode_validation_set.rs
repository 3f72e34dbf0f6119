//! Fuzzes decoding of validation sets, the largest frame a device decodes (64 MiB cap).
#![no_main]
outpost_protocol_fuzz::fuzz_decode!(outpost_protocol::device::ValidationSet);
