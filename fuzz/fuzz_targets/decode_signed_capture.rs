//! Fuzzes decoding of signed capture allowances as the hub serves them.
#![no_main]
use outpost_protocol::trust::{CaptureBody, Signed};
outpost_protocol_fuzz::fuzz_decode!(Signed<CaptureBody>);
