//! Data capture in the sync cycle, after telemetry: fetch the allowances of the models served
//! (`/device/v3/capture`) and verify each against the device's own root, seal what the request
//! path captured into the telemetry cache, and upload sealed samples (`/device/v3/captures`) until
//! the hub acknowledges them. Nothing here fails the cycle: a failure is logged and the next
//! cycle tries again, and inference never waits for any of it.

use outpost_protocol::capture::{
    seal, CaptureAck, CaptureAllowances, CaptureRequest, CaptureUpload, SealedSample,
    MAX_CAPTURE_BATCH, MAX_CAPTURE_BATCH_BYTES,
};
use outpost_protocol::device::InferenceWindow;
use outpost_protocol::drift::{assess, DriftStatus};
use outpost_protocol::sha256;
use outpost_protocol::trust::{capture_model_unverified, MAX_CAPTURE_SAMPLE_BYTES};

use crate::cache::QueuedSample;
use crate::hub_client::HubError;
use crate::state::ReportKind;
use crate::unix_now;

use super::Syncer;

/// Most upload batches of samples in one cycle: a backlog drains over several cycles.
const MAX_BATCHES_PER_CYCLE: usize = 8;

impl Syncer {
    /// The cycle's capture work. Never fails the cycle.
    pub(super) fn sync_capture(&mut self) {
        if self.hub_knows_capture {
            self.fetch_allowances();
        }
        self.seal_captured();
        if self.hub_knows_capture {
            if let Err(error) = self.upload_samples() {
                log::warn!("uploading captured samples: {error}; trying again next cycle");
            }
        }
    }

    /// Asks for the allowance of every model served, and acts on each that verifies: in the
    /// first cycle, when the models served changed, and otherwise once per `capture_interval`.
    fn fetch_allowances(&mut self) {
        let models: Vec<String> = self.slot.all().iter().map(|m| m.name.clone()).collect();
        if models.is_empty() {
            return;
        }
        let due = self.capture_asked.as_ref().is_none_or(|(asked, at)| {
            *asked != models || at.elapsed() >= self.config.capture_interval
        });
        if !due {
            return;
        }
        let answer: Result<CaptureAllowances, HubError> = self.client.call(
            "/device/v3/capture",
            &CaptureRequest {
                models: models.clone(),
            },
        );
        let answer = match answer {
            Ok(answer) => answer,
            Err(HubError::Refused { status: 404, .. }) => {
                log::info!("the hub keeps no capture allowances (it answers 404): none asked for");
                self.hub_knows_capture = false;
                return;
            }
            Err(error) => {
                log::warn!("asking for capture allowances: {error}; trying again next cycle");
                return;
            }
        };
        self.capture_asked = Some((models.clone(), std::time::Instant::now()));
        let floor = self.floor();
        for signed in answer.allowances {
            let signed = signed.into_vec();
            let digest = sha256(&signed);
            if self.capturer.current_digest_is(&digest) {
                continue;
            }
            let named = capture_model_unverified(&signed).unwrap_or_default();
            let verdict = if models.contains(&named) {
                self.root
                    .verify_capture(&signed, &floor, Some(&named), self.capturer.highest(&named))
                    .map_err(|error| error.to_string())
            } else {
                Err(format!(
                    "it names model {named:?}, which this device does not serve"
                ))
            };
            let verdict = verdict.and_then(|verified| {
                if Some(verified.sequence()) == self.capturer.highest(&named) {
                    Err(format!(
                        "it differs from the allowance {} of {named} this device already \
                         accepted at that sequence",
                        verified.sequence()
                    ))
                } else {
                    Ok(verified)
                }
            });
            match verdict {
                Ok(verified) => {
                    let body = verified.body();
                    log::info!(
                        "capture allowance {} of {} accepted: {} ppm of requests, at most {} \
                         samples and {} bytes a day, {}",
                        body.sequence,
                        body.model,
                        body.rate_ppm,
                        body.max_samples_per_day,
                        body.max_bytes_per_day,
                        body.trigger.as_str()
                    );
                    if let Err(error) = self.capturer.install(&verified) {
                        log::error!("saving capture allowance: {error:#}");
                    }
                }
                Err(reason) => {
                    if self.capture_refused.insert(digest) {
                        let reason = format!("capture allowance refused: {reason}");
                        log::warn!("{reason}");
                        self.report_event(ReportKind::Refused, reason);
                    }
                }
            }
        }
    }

    /// Seals what the request path captured into the telemetry cache. Today's counts are saved
    /// before the samples are queued, so a crash in between loses samples rather than cap.
    fn seal_captured(&mut self) {
        let taken = self.capturer.take_queued();
        let dropped = self.capturer.take_dropped();
        if let Err(error) = self.cache.count_dropped_samples(dropped) {
            log::error!("counting dropped captured samples: {error}");
        }
        if taken.is_empty() {
            return;
        }
        let now = unix_now();
        let mut sealed = Vec::new();
        for taken in taken {
            let sample = &taken.sample;
            let frame = match outpost_protocol::encode(sample) {
                Ok(frame) => frame,
                Err(error) => {
                    log::warn!(
                        "a captured request of {}@{} is too large to keep: {error}",
                        sample.model,
                        sample.version
                    );
                    continue;
                }
            };
            let mut ephemeral = [0u8; 32];
            let mut id = [0u8; 16];
            if getrandom::getrandom(&mut ephemeral)
                .and_then(|()| getrandom::getrandom(&mut id))
                .is_err()
            {
                log::error!("no randomness to seal a captured sample with; dropped it");
                continue;
            }
            let bytes = match seal(&taken.recipient, ephemeral, &frame) {
                Ok(bytes) if bytes.len() <= MAX_CAPTURE_SAMPLE_BYTES => bytes,
                Ok(_) | Err(_) => continue,
            };
            if !self
                .capturer
                .count_bytes(&sample.model, bytes.len() as u64, now)
            {
                continue;
            }
            sealed.push(QueuedSample {
                id,
                model: sample.model.clone(),
                version: sample.version,
                allowance: sample.allowance,
                captured_at: sample.captured_at,
                sealed: bytes,
            });
        }
        if let Err(error) = self.capturer.persist() {
            log::error!("saving today's capture counts: {error:#}; not keeping the samples");
            return;
        }
        for sample in &sealed {
            if let Err(error) = self.cache.append_sample(sample) {
                log::error!("queueing a captured sample: {error}");
            }
        }
    }

    /// Uploads queued samples in batches, each removed only once the hub acknowledged it.
    fn upload_samples(&mut self) -> Result<(), HubError> {
        for _ in 0..MAX_BATCHES_PER_CYCLE {
            let (batch, dropped) = match self
                .cache
                .pending_samples(MAX_CAPTURE_BATCH, MAX_CAPTURE_BATCH_BYTES)
            {
                Ok(pending) => pending,
                Err(error) => {
                    log::error!("reading captured samples: {error}");
                    return Ok(());
                }
            };
            if batch.is_empty() && dropped == 0 {
                return Ok(());
            }
            let keys: Vec<u64> = batch.iter().map(|(key, _)| *key).collect();
            let upload = CaptureUpload {
                samples: batch
                    .into_iter()
                    .map(|(_, sample)| SealedSample {
                        id: sample.id,
                        model: sample.model,
                        version: sample.version,
                        allowance: sample.allowance,
                        captured_at: sample.captured_at,
                        sealed: sample.sealed,
                    })
                    .collect(),
                dropped,
            };
            debug_assert!(upload.samples.len() <= MAX_CAPTURE_BATCH);
            let sent: Result<CaptureAck, HubError> =
                self.client.call("/device/v3/captures", &upload);
            match sent {
                Ok(_) => {}
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => {
                    // Sending them again would be refused again and hold up the queue.
                    let reason = format!(
                        "hub refused {} captured samples: {error}; dropped them",
                        keys.len()
                    );
                    log::error!("{reason}");
                    self.report_event(ReportKind::Failed, reason);
                }
            }
            if let Err(error) = self.cache.acknowledge_samples(&keys, dropped) {
                log::error!("forgetting uploaded samples: {error}");
                return Ok(());
            }
            if keys.is_empty() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Notes, for each served model version whose windows carry a drift summary, whether this
    /// device's own summary is flagged ALERT against the model's signed profile: what a
    /// `while-drift-alert` allowance waits for.
    pub(super) fn note_drift(&self, windows: &[InferenceWindow]) {
        for window in windows {
            let Some(summary) = &window.drift else {
                continue;
            };
            let Some(active) = self
                .slot
                .get(&window.model)
                .filter(|active| active.version == window.version)
            else {
                continue;
            };
            let Some(drift) = &active.drift else {
                continue;
            };
            let alert = assess(&drift.profile, summary)
                .iter()
                .any(|feature| feature.status == DriftStatus::Alert);
            self.capturer
                .set_drift_alert(&window.model, window.version, alert);
        }
    }
}
