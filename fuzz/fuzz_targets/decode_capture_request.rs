//! Fuzzes decoding of capture requests as the hub receives them.
#![no_main]
use outpost_protocol::capture::CaptureRequest;
outpost_protocol_fuzz::fuzz_decode!(CaptureRequest);
