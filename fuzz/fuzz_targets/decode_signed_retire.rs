//! Fuzzes decoding of signed retirements as the hub serves them.
#![no_main]
use outpost_protocol::trust::{RetireBody, Signed};
outpost_protocol_fuzz::fuzz_decode!(Signed<RetireBody>);
