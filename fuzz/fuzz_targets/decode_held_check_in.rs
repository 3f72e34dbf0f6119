//! Fuzzes decoding of check-ins that name the documents a device holds.
#![no_main]
outpost_protocol_fuzz::fuzz_decode!(outpost_protocol::device::HeldCheckIn);
