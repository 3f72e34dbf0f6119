//! Fuzzes decoding of status reports, decoded by the hub from every device.
#![no_main]
outpost_protocol_fuzz::fuzz_decode!(outpost_protocol::device::StatusReport);
