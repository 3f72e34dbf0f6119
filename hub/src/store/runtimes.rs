//! Each device's latest runtime report, kept whole under the device's id: which inference runtime
//! serves each model it runs. Reports can arrive out of order (an agent's retry behind a newer
//! one), so the latest by the device's own time stays, whichever was written last.

use std::collections::HashMap;

use super::*;

impl Store {
    // Runtime reports.

    /// Stores `report` as `device`'s latest runtime report, unless the one stored is later (its
    /// `at` greater): a report of the same second replaces it. Returns whether it was stored.
    pub fn put_runtimes(&self, device: &[u8; 16], report: &RuntimeReportRecord) -> Result<bool> {
        let bytes = encode("runtimes", report)?;
        let mut stored = false;
        let mut plan = |current: Option<&IVec>| -> Result<Plan> {
            let later = match current {
                Some(current) => decode::<RuntimeReportRecord>("runtimes", current)?.at > report.at,
                None => false,
            };
            stored = !later;
            Ok(if later {
                Plan::Leave
            } else {
                Plan::Write(bytes.clone())
            })
        };
        let read = self.runtimes.get(device)?;
        let first = plan(read.as_ref())?;
        // Never stops: the plans only write or leave.
        let _ = apply_planned(&self.runtimes, device, read, first, &mut plan)?;
        Ok(stored)
    }

    /// A device's latest runtime report, if it sent one.
    pub fn runtimes(&self, device: &[u8; 16]) -> Result<Option<RuntimeReportRecord>> {
        self.runtimes
            .get(device)?
            .map(|bytes| decode("runtimes", &bytes))
            .transpose()
    }

    /// Every device's latest runtime report, by device id.
    pub fn all_runtimes(&self) -> Result<HashMap<[u8; 16], RuntimeReportRecord>> {
        self.runtimes
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                let device =
                    <[u8; 16]>::try_from(key.as_ref()).map_err(|_| StoreError::Corrupt {
                        tree: "runtimes",
                        reason: "bad key".into(),
                    })?;
                Ok((device, decode("runtimes", &value)?))
            })
            .collect()
    }
}
