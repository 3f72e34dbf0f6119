//! Fuzzes decoding of signed manifests as the hub serves them.
#![no_main]
use outpost_protocol::trust::{ManifestBody, Signed};
outpost_protocol_fuzz::fuzz_decode!(Signed<ManifestBody>);
