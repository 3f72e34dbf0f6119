//! Fuzzes decoding of opened capture samples as `capture open` decodes them.
#![no_main]
use outpost_protocol::capture::CaptureSample;
outpost_protocol_fuzz::fuzz_decode!(CaptureSample);
