//! Fuzzes decoding of answers to held check-ins: unchanged, or a full check-in response.
#![no_main]
outpost_protocol_fuzz::fuzz_decode!(outpost_protocol::device::HeldCheckInResponse);
