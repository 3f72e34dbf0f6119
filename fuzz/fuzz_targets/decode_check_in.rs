//! Fuzzes decoding of check-ins, the message the hub decodes most often.
#![no_main]
outpost_protocol_fuzz::fuzz_decode!(outpost_protocol::device::CheckIn);
