//! Fuzzes decoding of the hub's capture allowances answer as the agent receives it.
#![no_main]
use outpost_protocol::capture::CaptureAllowances;
outpost_protocol_fuzz::fuzz_decode!(CaptureAllowances);
