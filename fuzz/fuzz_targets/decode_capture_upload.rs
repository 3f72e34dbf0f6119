//! Fuzzes decoding of capture uploads as the hub receives them.
#![no_main]
use outpost_protocol::capture::CaptureUpload;
outpost_protocol_fuzz::fuzz_decode!(CaptureUpload);
