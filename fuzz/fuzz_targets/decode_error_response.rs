//! Fuzzes decoding of error responses, decoded by a device from any non-2xx reply.
#![no_main]
outpost_protocol_fuzz::fuzz_decode!(outpost_protocol::device::ErrorResponse);
