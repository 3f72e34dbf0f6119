//! Storage records: the telemetry cache's on-disk types (windows, records, the outbox batch,
//! the meta record) in every format version an agent wrote, and their encoding.

#[allow(unused_imports)]
use super::*;

// Storage records: the agent's own types, converted by hand from the wire types. The outer enums
// carry a format version so a later agent can still read what an older one wrote.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct StoredWindow {
    pub(super) model: String,
    pub(super) version: u64,
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) count: u64,
    pub(super) errors: u64,
    pub(super) latency_buckets: Vec<u64>,
    /// The window's drift summary as its protocol frame, when the model has a profile.
    pub(super) drift: Option<Vec<u8>>,
    /// A shadow window's comparisons.
    pub(super) shadow: Option<StoredShadow>,
}

/// A shadow report as the cache keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct StoredShadow {
    pub(super) target_name: String,
    pub(super) target_version: u64,
    pub(super) target_sha256: [u8; 32],
    pub(super) compared: u64,
    pub(super) top1_agreed: u64,
    pub(super) errors: u64,
    pub(super) abs_diff_sum: f64,
    pub(super) abs_diff_values: u64,
    pub(super) dropped: u64,
}

impl StoredShadow {
    pub(super) fn from_wire(report: &ShadowReport) -> StoredShadow {
        let mut stored = StoredShadow {
            target_name: report.target.name.clone(),
            target_version: report.target.version,
            target_sha256: report.target.manifest_sha256.0,
            compared: 0,
            top1_agreed: 0,
            errors: 0,
            abs_diff_sum: 0.0,
            abs_diff_values: 0,
            dropped: 0,
        };
        stored.set_counts(&report.counts);
        stored
    }

    pub(super) fn set_counts(&mut self, counts: &ShadowCounts) {
        self.compared = counts.compared;
        self.top1_agreed = counts.top1_agreed;
        self.errors = counts.errors;
        self.abs_diff_sum = counts.abs_diff_sum;
        self.abs_diff_values = counts.abs_diff_values;
        self.dropped = counts.dropped;
    }

    pub(super) fn counts(&self) -> ShadowCounts {
        ShadowCounts {
            compared: self.compared,
            top1_agreed: self.top1_agreed,
            errors: self.errors,
            abs_diff_sum: self.abs_diff_sum,
            abs_diff_values: self.abs_diff_values,
            dropped: self.dropped,
        }
    }

    pub(super) fn into_wire(self) -> ShadowReport {
        ShadowReport {
            counts: self.counts(),
            target: ManifestRef {
                name: self.target_name,
                version: self.target_version,
                manifest_sha256: Sha256(self.target_sha256),
            },
        }
    }

    /// Adds `other`'s counts; windows are grouped by target before they merge.
    pub(super) fn merge(&mut self, other: &StoredShadow) {
        let mut counts = self.counts();
        counts.add(&other.counts());
        self.set_counts(&counts);
    }
}

/// A window as format V2 stored it, before shadow reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StoredWindowV2 {
    pub(super) model: String,
    pub(super) version: u64,
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) count: u64,
    pub(super) errors: u64,
    pub(super) latency_buckets: Vec<u64>,
    pub(super) drift: Option<Vec<u8>>,
}

impl From<StoredWindowV2> for StoredWindow {
    fn from(old: StoredWindowV2) -> StoredWindow {
        StoredWindow {
            model: old.model,
            version: old.version,
            start: old.start,
            end: old.end,
            count: old.count,
            errors: old.errors,
            latency_buckets: old.latency_buckets,
            drift: old.drift,
            shadow: None,
        }
    }
}

/// A window as format V1 stored it, before drift summaries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StoredWindowV1 {
    pub(super) model: String,
    pub(super) version: u64,
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) count: u64,
    pub(super) errors: u64,
    pub(super) latency_buckets: Vec<u64>,
}

impl From<StoredWindowV1> for StoredWindow {
    fn from(old: StoredWindowV1) -> StoredWindow {
        StoredWindow {
            model: old.model,
            version: old.version,
            start: old.start,
            end: old.end,
            count: old.count,
            errors: old.errors,
            latency_buckets: old.latency_buckets,
            drift: None,
            shadow: None,
        }
    }
}

impl StoredWindow {
    pub(super) fn from_wire(window: &InferenceWindow) -> StoredWindow {
        StoredWindow {
            model: window.model.clone(),
            version: window.version,
            start: window.start,
            end: window.end,
            count: window.count,
            errors: window.errors,
            latency_buckets: window.latency_buckets.clone(),
            drift: window.drift.as_ref().and_then(|summary| {
                outpost_protocol::encode(summary)
                    .map_err(|error| log::error!("encoding a drift summary for the cache: {error}"))
                    .ok()
            }),
            shadow: window.shadow.as_ref().map(StoredShadow::from_wire),
        }
    }

    pub(super) fn into_wire(self) -> InferenceWindow {
        InferenceWindow {
            model: self.model,
            version: self.version,
            start: self.start,
            end: self.end,
            count: self.count,
            errors: self.errors,
            latency_buckets: self.latency_buckets,
            drift: self.drift.and_then(|bytes| {
                outpost_protocol::decode::<DriftSummary>(&bytes)
                    .map_err(|error| {
                        log::error!("a cached drift summary is unreadable, dropping it: {error}")
                    })
                    .ok()
            }),
            shadow: self.shadow.map(StoredShadow::into_wire),
        }
    }

    /// Roughly what this window takes in a batch: its counters plus its drift frame and shadow
    /// report.
    pub(super) fn stored_size(&self) -> usize {
        let shadow = self
            .shadow
            .as_ref()
            .map_or(0, |shadow| 128 + shadow.target_name.len());
        128 + self.model.len() + self.drift.as_ref().map_or(0, Vec::len) + shadow
    }

    /// Adds `other`'s counts into this window and widens it to cover both.
    pub(super) fn merge(&mut self, other: &StoredWindow) {
        self.start = self.start.min(other.start);
        self.end = self.end.max(other.end);
        self.count = self.count.saturating_add(other.count);
        self.errors = self.errors.saturating_add(other.errors);
        if self.latency_buckets.len() < other.latency_buckets.len() {
            self.latency_buckets.resize(other.latency_buckets.len(), 0);
        }
        for (sum, add) in self.latency_buckets.iter_mut().zip(&other.latency_buckets) {
            *sum = sum.saturating_add(*add);
        }
        self.drift = merge_drift(self.drift.take(), other.drift.as_deref());
        match (&mut self.shadow, &other.shadow) {
            (Some(ours), Some(theirs)) => ours.merge(theirs),
            (ours @ None, Some(theirs)) => *ours = Some(theirs.clone()),
            (_, None) => {}
        }
    }

    /// What windows must share, besides model, version and day, to be rolled up into one: the
    /// shadow target they compared, if any.
    pub(super) fn shadow_target(&self) -> Option<[u8; 32]> {
        self.shadow.as_ref().map(|shadow| shadow.target_sha256)
    }
}

/// The merge of two windows' drift frames. A frame that does not decode or merge is logged and
/// the other one kept: the counters of both windows still add, only that summary is lost.
pub(super) fn merge_drift(ours: Option<Vec<u8>>, theirs: Option<&[u8]>) -> Option<Vec<u8>> {
    let Some(theirs) = theirs else {
        return ours;
    };
    let Some(ours) = ours else {
        return Some(theirs.to_vec());
    };
    let merged = outpost_protocol::decode::<DriftSummary>(&ours).and_then(|mut summary| {
        let other = outpost_protocol::decode::<DriftSummary>(theirs)?;
        Ok((summary.merge(&other), summary))
    });
    match merged {
        Ok((Ok(()), summary)) => match outpost_protocol::encode(&summary) {
            Ok(bytes) => Some(bytes),
            Err(error) => {
                log::error!("encoding a merged drift summary: {error}");
                Some(ours)
            }
        },
        Ok((Err(error), _)) => {
            log::warn!("drift summaries of one window do not merge, keeping one: {error}");
            Some(ours)
        }
        Err(error) => {
            log::error!("a cached drift summary is unreadable: {error}");
            Some(ours)
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) enum StoredRecord {
    V1 {
        windows: Vec<StoredWindowV1>,
    },
    /// Windows with their drift summaries.
    V2 {
        windows: Vec<StoredWindowV2>,
    },
    /// Windows with their drift summaries and shadow reports.
    V3 {
        windows: Vec<StoredWindow>,
    },
}

impl StoredRecord {
    pub(super) fn into_windows(self) -> Vec<StoredWindow> {
        match self {
            StoredRecord::V1 { windows } => windows.into_iter().map(StoredWindow::from).collect(),
            StoredRecord::V2 { windows } => windows.into_iter().map(StoredWindow::from).collect(),
            StoredRecord::V3 { windows } => windows,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) enum StoredOutbox {
    V1 {
        sequence: u64,
        dropped_records: u64,
        windows: Vec<StoredWindowV1>,
        keys: Vec<u64>,
    },
    V2 {
        sequence: u64,
        dropped_records: u64,
        windows: Vec<StoredWindowV2>,
        keys: Vec<u64>,
    },
    V3 {
        sequence: u64,
        dropped_records: u64,
        windows: Vec<StoredWindow>,
        keys: Vec<u64>,
    },
}

/// An outbox batch, whichever format stored it.
pub(super) struct OutboxParts {
    pub(super) sequence: u64,
    pub(super) dropped_records: u64,
    pub(super) windows: Vec<StoredWindow>,
    pub(super) keys: Vec<u64>,
}

impl StoredOutbox {
    pub(super) fn into_parts(self) -> OutboxParts {
        match self {
            StoredOutbox::V1 {
                sequence,
                dropped_records,
                windows,
                keys,
            } => OutboxParts {
                sequence,
                dropped_records,
                windows: windows.into_iter().map(StoredWindow::from).collect(),
                keys,
            },
            StoredOutbox::V2 {
                sequence,
                dropped_records,
                windows,
                keys,
            } => OutboxParts {
                sequence,
                dropped_records,
                windows: windows.into_iter().map(StoredWindow::from).collect(),
                keys,
            },
            StoredOutbox::V3 {
                sequence,
                dropped_records,
                windows,
                keys,
            } => OutboxParts {
                sequence,
                dropped_records,
                windows,
                keys,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct MetaV1 {
    /// Key of the next record appended.
    pub(super) next_record: u64,
    /// Sequence of the next batch formed.
    pub(super) next_sequence: u64,
    pub(super) dropped_since_batch: u64,
    pub(super) dropped_total: u64,
    pub(super) merged_total: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) enum StoredMeta {
    V1(MetaV1),
}

pub(super) fn encode<T: Serialize>(tree: &'static str, value: &T) -> Result<Vec<u8>, CacheError> {
    postcard::to_stdvec(value).map_err(|error| CacheError::Encode {
        tree,
        reason: error.to_string(),
    })
}

pub(super) fn decode<T: DeserializeOwned>(tree: &str, bytes: &[u8]) -> Result<T, String> {
    postcard::from_bytes(bytes).map_err(|error| format!("{tree} record: {error}"))
}

pub(super) fn record_key(key: &[u8]) -> Result<u64, String> {
    <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| format!("records key of {} bytes", key.len()))
}

pub(super) fn encode_record(windows: &[StoredWindow]) -> Result<Vec<u8>, CacheError> {
    encode(
        "records",
        &StoredRecord::V3 {
            windows: windows.to_vec(),
        },
    )
}
