//! How a stored device looks to the rest of the server: its labels and the state operators see.
//!
//! The device API, the rollout engine's cache, drift reports, `/metrics`, the admin API and the
//! dashboard all read these; keeping them here lets those modules depend on this one instead of
//! on each other.

use std::time::Duration;

use outpost_protocol::Label;

use crate::store::DeviceRecord;

/// How long a device may go without a check-in before operators see it as silent, whatever its
/// poll interval.
pub const SILENT_AFTER: Duration = Duration::from_secs(600);

pub fn labels_of(device: &DeviceRecord) -> Vec<Label> {
    device
        .labels
        .iter()
        .map(|(key, value)| Label {
            key: key.clone(),
            value: value.clone(),
        })
        .collect()
}

/// The state shown to operators: what the device last reported, unless it has gone quiet.
pub fn display_state(device: &DeviceRecord, now: u64) -> String {
    if device.revoked {
        return "revoked".to_owned();
    }
    match device.last_checkin {
        Some(at) if now.saturating_sub(at) > SILENT_AFTER.as_secs() => "silent".to_owned(),
        None => "enrolled".to_owned(),
        Some(_) => device.state.clone(),
    }
}
