//! Telemetry upload: windows move from memory to the disk cache, and batches from the cache
//! to the hub until it acknowledges them.

use std::time::Instant;

use outpost_protocol::device::{TelemetryAck, TelemetryBatch};
use outpost_protocol::Message;

use crate::cache::{self};
use crate::hub_client::HubError;
use crate::state::ReportKind;

use super::Syncer;

/// Most windows uploaded in one telemetry batch.
const MAX_BATCH_WINDOWS: usize = 1000;
/// Stored bytes of windows (drift summaries included) in one telemetry batch: half the frame cap,
/// so the encoded batch stays well inside it.
const MAX_BATCH_BYTES: usize = TelemetryBatch::MAX_FRAME / 2;
impl Syncer {
    /// Moves finished in-memory windows into the disk cache.
    pub(super) fn flush_telemetry(&mut self) {
        let windows = self.recorder.take_all();
        self.note_drift(&windows);
        if !windows.is_empty() {
            if let Err(error) = self.cache.append(&windows) {
                log::error!("caching {} telemetry windows: {error}", windows.len());
            }
        }
        self.last_telemetry_flush = Instant::now();
    }

    pub(super) fn upload_telemetry(&mut self) -> Result<(), HubError> {
        let batch = match self.cache.pending(MAX_BATCH_WINDOWS, MAX_BATCH_BYTES) {
            Ok(Some(batch)) => batch,
            Ok(None) => return Ok(()),
            Err(error) => {
                log::error!("reading the telemetry cache: {error}");
                return Ok(());
            }
        };
        let sequence = batch.sequence;
        let sent: Result<TelemetryAck, HubError> = self.client.call(
            "/device/v1/telemetry",
            &TelemetryBatch {
                sequence,
                windows: batch.windows,
                dropped_records: batch.dropped_records,
            },
        );
        let ack = match sent {
            Ok(ack) => ack,
            Err(error) if error.is_transient() => return Err(error),
            Err(error) => {
                // Sending it again would be refused again and hold up the whole queue.
                let reason = format!("hub refused telemetry batch {sequence}: {error}");
                match self.cache.refused(sequence) {
                    Ok(cache::Refusal::DriftStripped) => {
                        log::error!("{reason}; sending it again without its drift summaries");
                    }
                    Ok(cache::Refusal::Dropped { windows }) => {
                        log::error!("{reason}; dropped it, {windows} windows counted as dropped");
                    }
                    Err(cache_error) => log::error!("{reason}; {cache_error}"),
                }
                self.report_event(ReportKind::TelemetryRefused, reason);
                return Ok(());
            }
        };
        if ack.sequence == sequence {
            if let Err(error) = self.cache.acknowledge(sequence) {
                log::error!("acknowledging telemetry batch {sequence}: {error}");
            }
        }
        Ok(())
    }
}
