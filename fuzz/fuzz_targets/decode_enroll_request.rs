//! Fuzzes decoding of enroll requests, which the hub decodes from unauthenticated devices.
#![no_main]
outpost_protocol_fuzz::fuzz_decode!(outpost_protocol::device::EnrollRequest);
