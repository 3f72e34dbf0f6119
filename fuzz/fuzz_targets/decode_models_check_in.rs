//! Fuzzes decoding of check-ins that name every model a device runs.
#![no_main]
outpost_protocol_fuzz::fuzz_decode!(outpost_protocol::device::ModelsCheckIn);
