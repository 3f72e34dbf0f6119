//! How a stored device looks to the rest of the server: its labels and the state operators see.
//!
//! The device API, the rollout engine's cache, drift reports, `/metrics`, the admin API and the
//! dashboard all read these; keeping them here lets those modules depend on this one instead of
//! on each other.

use std::time::Duration;

use outpost_protocol::device::AgentState;
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

/// The state operators see for a device: what it last reported, unless it has gone quiet, has
/// not checked in yet, or is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DeviceState {
    Enrolled,
    Steady,
    Downloading,
    Probation,
    Degraded,
    Silent,
    Revoked,
    /// A state a newer hub stored that this one does not know.
    Unknown,
}

impl DeviceState {
    const ALL: [DeviceState; 8] = [
        DeviceState::Enrolled,
        DeviceState::Steady,
        DeviceState::Downloading,
        DeviceState::Probation,
        DeviceState::Degraded,
        DeviceState::Silent,
        DeviceState::Revoked,
        DeviceState::Unknown,
    ];

    /// The state's name in the admin API, the dashboard, `/metrics` and the device record.
    pub const fn as_str(self) -> &'static str {
        match self {
            DeviceState::Enrolled => "enrolled",
            DeviceState::Steady => "steady",
            DeviceState::Downloading => "downloading",
            DeviceState::Probation => "probation",
            DeviceState::Degraded => "degraded",
            DeviceState::Silent => "silent",
            DeviceState::Revoked => "revoked",
            DeviceState::Unknown => "unknown",
        }
    }

    pub fn parse(text: &str) -> Option<DeviceState> {
        DeviceState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
    }

    /// What a device reporting `state` in its check-in is in.
    pub const fn reported(state: AgentState) -> DeviceState {
        match state {
            AgentState::Steady => DeviceState::Steady,
            AgentState::Downloading => DeviceState::Downloading,
            AgentState::Probation => DeviceState::Probation,
            AgentState::Degraded => DeviceState::Degraded,
        }
    }
}

/// The state shown to operators: what the device last reported (stored by its name in the
/// device record), unless it has gone quiet.
pub fn display_state(device: &DeviceRecord, now: u64) -> DeviceState {
    if device.revoked {
        return DeviceState::Revoked;
    }
    match device.last_checkin {
        Some(at) if now.saturating_sub(at) > SILENT_AFTER.as_secs() => DeviceState::Silent,
        None => DeviceState::Enrolled,
        Some(_) => DeviceState::parse(&device.state).unwrap_or(DeviceState::Unknown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Device records keep the reported state by name; these are the names every hub so far
    /// wrote, so records stored before the enum read back as the same states.
    #[test]
    fn reported_states_keep_the_names_stored_so_far_and_read_back() {
        let stored = [
            (AgentState::Steady, "steady"),
            (AgentState::Downloading, "downloading"),
            (AgentState::Probation, "probation"),
            (AgentState::Degraded, "degraded"),
        ];
        for (reported, name) in stored {
            let state = DeviceState::reported(reported);
            assert_eq!(state.as_str(), name);
            assert_eq!(DeviceState::parse(name), Some(state));
        }
        for state in DeviceState::ALL {
            assert_eq!(DeviceState::parse(state.as_str()), Some(state));
        }
        assert_eq!(DeviceState::parse("from a newer hub"), None);
    }
}
