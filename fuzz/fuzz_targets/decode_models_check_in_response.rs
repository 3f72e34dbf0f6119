//! Fuzzes decoding of the hub's answers about every model a device runs.
#![no_main]
outpost_protocol_fuzz::fuzz_decode!(outpost_protocol::device::ModelsCheckInResponse);
