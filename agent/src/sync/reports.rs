//! The report outbox: status reports queued in the device state and delivered in order; and the
//! runtime report, which says which runtime serves each model.

use outpost_protocol::device::{
    ModelRuntime, RuntimeReport, Status, StatusReport, MAX_DEVICE_MODELS, MAX_RUNTIME_NOTE,
    MAX_RUNTIME_PROVIDERS, MAX_RUNTIME_TEXT,
};

use crate::hub_client::HubError;
use crate::slot::ActiveModel;
use crate::state::{DeviceState, QueuedReport, ReportKind, VersionRef};
use crate::unix_now;

use super::{wire_ref, Syncer};

/// The status a queued report travels as.
fn wire_status(report: &QueuedReport) -> Status {
    let reason = report.reason.clone();
    match report.kind {
        ReportKind::Downloaded => Status::Downloaded,
        ReportKind::Activating => Status::Activating,
        ReportKind::Committed => Status::Committed,
        ReportKind::Shadowing => Status::Shadowing,
        ReportKind::RolledBack => Status::RolledBack { reason },
        ReportKind::Refused => Status::Refused { reason },
        ReportKind::Stalled => Status::Stalled { reason },
        // The wire has no status for an event outside a rollout: it goes as `Failed`.
        ReportKind::Failed | ReportKind::TelemetryRefused => Status::Failed { reason },
    }
}

impl Syncer {
    pub(super) fn queue(
        &mut self,
        plan_sequence: Option<u64>,
        manifest: Option<VersionRef>,
        kind: ReportKind,
        reason: String,
    ) {
        self.state.queue(QueuedReport {
            plan_sequence,
            manifest,
            kind,
            reason,
            at: unix_now(),
        });
    }

    pub(super) fn refuse(
        &mut self,
        plan_sequence: Option<u64>,
        manifest: Option<VersionRef>,
        digest: [u8; 32],
        reason: String,
    ) {
        if self.state.refused.contains(&digest) {
            return;
        }
        log::warn!("refused: {reason}");
        DeviceState::remember(&mut self.state.refused, digest);
        self.queue(plan_sequence, manifest, ReportKind::Refused, reason);
    }

    /// Sends queued status reports in order. A transport failure stops and is returned, so the
    /// caller backs off, and so does a refusal of the request's authentication (401): the hub
    /// refuses a request signed at a time outside its clock-skew window, which says nothing about
    /// the report, so it is kept until the clocks agree. A report the hub refuses for itself is
    /// dropped with a warning.
    pub(super) fn deliver_reports(&mut self) -> Result<(), HubError> {
        while let Some(report) = self.state.outbox.first().cloned() {
            let wire = StatusReport {
                plan_sequence: report.plan_sequence,
                manifest: report.manifest.as_ref().map(wire_ref),
                status: wire_status(&report),
                at: report.at,
            };
            match self.client.send("/device/v1/status", &wire) {
                Ok(()) => {}
                Err(error) if error.is_transient() || error.is_unauthorized() => return Err(error),
                Err(error) => log::warn!("hub refused a status report, dropping it: {error}"),
            }
            self.state.outbox.remove(0);
        }
        Ok(())
    }

    /// Tells the hub which runtime serves each model, when that changed since the hub last
    /// acknowledged it (and once after a start), after the cycle's status reports so the hub has
    /// heard of every version named. A hub that does not know the path (404, older than runtime
    /// reports) is not asked again until the agent restarts; any other failure is tried again
    /// next cycle, and never holds up the cycle.
    pub(super) fn deliver_runtimes(&mut self) {
        if !self.hub_knows_models || !self.hub_knows_runtimes {
            return;
        }
        let mut serving = self.slot.all();
        serving.sort_by(|a, b| a.name.cmp(&b.name));
        let models: Vec<ModelRuntime> = serving
            .iter()
            .take(MAX_DEVICE_MODELS)
            .map(|active| model_runtime(active))
            .collect();
        if self.runtimes_reported.as_ref() == Some(&models) {
            return;
        }
        let report = RuntimeReport {
            models,
            at: unix_now(),
        };
        match self.client.send("/device/v3/runtimes", &report) {
            Ok(()) => self.runtimes_reported = Some(report.models),
            Err(HubError::Refused { status: 404, .. }) => {
                log::info!(
                    "{} does not take runtime reports; not sending them until restarted",
                    self.client.base_url()
                );
                self.hub_knows_runtimes = false;
            }
            Err(error) if error.is_transient() || error.is_unauthorized() => {
                log::info!("runtime report not delivered, next cycle: {error}")
            }
            // Refused for itself (say, naming a version the hub has not heard is served yet):
            // sent again next cycle, when the hub may have heard.
            Err(error) => log::warn!("hub refused the runtime report: {error}"),
        }
    }

    /// Queues an event for the hub that is not about a rollout (a quarantined cache, say).
    pub fn report_event(&mut self, kind: ReportKind, reason: String) {
        self.queue(None, None, kind, reason);
    }
}

/// What is reported of one served model, each text cut to what the hub takes.
fn model_runtime(active: &ActiveModel) -> ModelRuntime {
    let info = active.model.runtime();
    ModelRuntime {
        name: active.name.clone(),
        version: active.version,
        runtime: info.kind,
        runtime_version: cut(info.version, MAX_RUNTIME_TEXT),
        providers: info
            .providers
            .into_iter()
            .take(MAX_RUNTIME_PROVIDERS)
            .map(|provider| cut(provider, MAX_RUNTIME_TEXT))
            .collect(),
        fallback: active
            .runtime_fallback
            .clone()
            .map(|reason| cut(reason, MAX_RUNTIME_NOTE)),
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(kind: ReportKind) -> QueuedReport {
        QueuedReport {
            plan_sequence: Some(1),
            manifest: None,
            kind,
            reason: "why".into(),
            at: 0,
        }
    }

    #[test]
    fn each_kind_travels_as_its_status_and_events_as_failed() {
        let reason = || "why".to_owned();
        let cases = [
            (ReportKind::Downloaded, Status::Downloaded),
            (ReportKind::Activating, Status::Activating),
            (ReportKind::Committed, Status::Committed),
            (ReportKind::Shadowing, Status::Shadowing),
            (
                ReportKind::RolledBack,
                Status::RolledBack { reason: reason() },
            ),
            (ReportKind::Refused, Status::Refused { reason: reason() }),
            (ReportKind::Stalled, Status::Stalled { reason: reason() }),
            (ReportKind::Failed, Status::Failed { reason: reason() }),
            (
                ReportKind::TelemetryRefused,
                Status::Failed { reason: reason() },
            ),
        ];
        for (kind, status) in cases {
            assert_eq!(wire_status(&report(kind)), status, "{kind}");
        }
    }
}
