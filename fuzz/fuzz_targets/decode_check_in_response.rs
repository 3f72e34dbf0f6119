//! Fuzzes decoding of check-in responses, which carry roots, plans and manifests to a device.
#![no_main]
outpost_protocol_fuzz::fuzz_decode!(outpost_protocol::device::CheckInResponse);
