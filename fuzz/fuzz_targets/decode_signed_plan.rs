//! Fuzzes decoding of signed rollout plans as the hub serves them.
#![no_main]
use outpost_protocol::trust::{PlanBody, Signed};
outpost_protocol_fuzz::fuzz_decode!(Signed<PlanBody>);
