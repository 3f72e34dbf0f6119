//! Fuzzes decoding of manifest payloads, decoded once their signatures check out.
#![no_main]
outpost_protocol_fuzz::fuzz_decode!(outpost_protocol::trust::ManifestBody);
