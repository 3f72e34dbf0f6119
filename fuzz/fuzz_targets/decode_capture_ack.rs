//! Fuzzes decoding of capture acknowledgements as the agent receives them.
#![no_main]
use outpost_protocol::capture::CaptureAck;
outpost_protocol_fuzz::fuzz_decode!(CaptureAck);
