//! The in-memory index of the cache: each record's size, window count and day span, the outbox,
//! and pending changes, so decisions near the cap read no record they need not.

#[allow(unused_imports)]
use super::*;

/// Size, window count and UTC days of one queued record, known without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RecordInfo {
    pub(super) bytes: u64,
    pub(super) windows: u64,
    pub(super) days: DaySpan,
}

impl RecordInfo {
    pub(super) fn new(bytes: u64, windows: &[StoredWindow]) -> RecordInfo {
        let days = windows.iter().map(|window| window.start / DAY_SECS);
        RecordInfo {
            bytes,
            windows: windows.len() as u64,
            days: DaySpan {
                first: days.clone().min().unwrap_or(0),
                last: days.max().unwrap_or(0),
            },
        }
    }
}

/// The first and last UTC day (days since the epoch) a record's windows start on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DaySpan {
    pub(super) first: u64,
    pub(super) last: u64,
}

/// Day spans merged into disjoint ones, in order, so that an overlap is one binary search.
#[derive(Debug, Default)]
pub(super) struct DaySpans(pub(super) Vec<DaySpan>);

impl DaySpans {
    pub(super) fn new(spans: impl IntoIterator<Item = DaySpan>) -> DaySpans {
        let mut sorted: Vec<DaySpan> = spans.into_iter().collect();
        sorted.sort_unstable_by_key(|span| span.first);
        let mut merged: Vec<DaySpan> = Vec::with_capacity(sorted.len());
        for span in sorted {
            match merged.last_mut() {
                Some(last) if span.first <= last.last.saturating_add(1) => {
                    last.last = last.last.max(span.last);
                }
                _ => merged.push(span),
            }
        }
        DaySpans(merged)
    }

    pub(super) fn overlaps(&self, days: &DaySpan) -> bool {
        let first_not_before = self.0.partition_point(|span| span.last < days.first);
        self.0
            .get(first_not_before)
            .is_some_and(|span| span.first <= days.last)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OutboxInfo {
    pub(super) sequence: u64,
    pub(super) dropped_records: u64,
    pub(super) windows: u64,
    pub(super) bytes: u64,
}

/// The in-memory mirror of what is on disk, changed only after a transaction commits.
#[derive(Debug, Clone)]
pub(super) struct State {
    pub(super) index: BTreeMap<u64, RecordInfo>,
    pub(super) outbox: Option<OutboxInfo>,
    pub(super) meta: MetaV1,
    /// Logical bytes: every `RecordInfo::bytes` plus the outbox's.
    pub(super) total_bytes: u64,
    /// Every record up to this key was in a finished roll-up: no two of their windows share a
    /// (model, version, day, shadow target), but where a roll-up let go of a record a later one,
    /// out of time order, still shared a day with. `None` until the first roll-up since open.
    pub(super) rolled_through: Option<u64>,
}

/// A pending change: the state it leads to and the writes that get there, committed at once.
#[derive(Debug)]
pub(super) struct Change {
    pub(super) state: State,
    /// `Some` puts the record, `None` removes it.
    pub(super) records: BTreeMap<u64, Option<Vec<u8>>>,
    /// `None`: the outbox is untouched; `Some(None)`: removed; `Some(Some(bytes))`: replaced.
    pub(super) outbox: Option<Option<Vec<u8>>>,
}

impl Change {
    pub(super) fn new(state: &State) -> Change {
        Change {
            state: state.clone(),
            records: BTreeMap::new(),
            outbox: None,
        }
    }

    pub(super) fn put_record(&mut self, key: u64, value: Vec<u8>, windows: &[StoredWindow]) {
        let info = RecordInfo::new(8 + value.len() as u64, windows);
        if let Some(old) = self.state.index.insert(key, info) {
            self.state.total_bytes -= old.bytes;
        }
        self.state.total_bytes += info.bytes;
        self.records.insert(key, Some(value));
    }

    pub(super) fn remove_record(&mut self, key: u64) {
        if let Some(old) = self.state.index.remove(&key) {
            self.state.total_bytes -= old.bytes;
        }
        self.records.insert(key, None);
    }

    pub(super) fn put_outbox(
        &mut self,
        sequence: u64,
        dropped_records: u64,
        windows: &[StoredWindow],
        keys: &[u64],
    ) -> Result<(), CacheError> {
        let value = encode(
            "outbox",
            &StoredOutbox::V3 {
                sequence,
                dropped_records,
                windows: windows.to_vec(),
                keys: keys.to_vec(),
            },
        )?;
        self.remove_outbox();
        let info = OutboxInfo {
            sequence,
            dropped_records,
            windows: windows.len() as u64,
            bytes: (OUTBOX_KEY.len() + value.len()) as u64,
        };
        self.state.total_bytes += info.bytes;
        self.state.outbox = Some(info);
        self.outbox = Some(Some(value));
        Ok(())
    }

    pub(super) fn remove_outbox(&mut self) {
        if let Some(old) = self.state.outbox.take() {
            self.state.total_bytes -= old.bytes;
        }
        self.outbox = Some(None);
    }
}

/// Most bytes of queued records (as stored) a roll-up holds decoded at once; when more, it keeps
/// only those a later record may still merge into.
pub(super) const ROLLUP_HELD_BYTES: u64 = 1024 * 1024;
