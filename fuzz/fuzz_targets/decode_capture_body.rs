//! Fuzzes decoding of capture allowance bodies.
#![no_main]
use outpost_protocol::trust::CaptureBody;
outpost_protocol_fuzz::fuzz_decode!(CaptureBody);
