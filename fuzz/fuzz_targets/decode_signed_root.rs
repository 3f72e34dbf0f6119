//! Fuzzes decoding of signed roots, which a device decodes before any key has vouched for them.
#![no_main]
use outpost_protocol::trust::{RootBody, Signed};
outpost_protocol_fuzz::fuzz_decode!(Signed<RootBody>);
