//! Fuzzes decoding of enroll responses, decoded by a device before it trusts the hub.
#![no_main]
outpost_protocol_fuzz::fuzz_decode!(outpost_protocol::device::EnrollResponse);
