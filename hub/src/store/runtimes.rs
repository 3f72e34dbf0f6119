//! Each device's latest runtime report, kept whole under the device's id: which inference runtime
//! serves each model it runs. Reports can arrive out of order (an agent's retry behind a newer
//! one), so the latest by the device's own time stays, whichever was written last.

use std::collections::HashMap;

use super::*;

impl Store {
    // Runtime reports.

    /// Stores `report` as `device`'s latest runtime report, unless the one stored is later (its
    /// `at` greater): a report of the same second replaces it. Returns whether it was stored.
    pub async fn put_runtimes(
        &self,
        device: &[u8; 16],
        report: &RuntimeReportRecord,
    ) -> Result<bool> {
        // One statement, whichever hub runs it: the stored report is replaced only by one the
        // device dated no earlier.
        let written = sqlx::query(
            "INSERT INTO runtimes (device, at, record) VALUES ($1, $2, $3) \
             ON CONFLICT (device) DO UPDATE SET at = excluded.at, record = excluded.record \
             WHERE runtimes.at <= excluded.at",
        )
        .bind(device.to_vec())
        .bind(int("report time", report.at)?)
        .bind(encode("runtimes", report)?)
        .execute(&self.writer)
        .await?;
        Ok(written.rows_affected() == 1)
    }

    /// A device's latest runtime report, if it sent one.
    pub async fn runtimes(&self, device: &[u8; 16]) -> Result<Option<RuntimeReportRecord>> {
        sqlx::query("SELECT record FROM runtimes WHERE device = $1")
            .bind(device.to_vec())
            .fetch_optional(&self.pool)
            .await?
            .map(|row| decode("runtimes", &blob(&row, 0)?))
            .transpose()
    }

    /// Every device's latest runtime report, by device id.
    pub async fn all_runtimes(&self) -> Result<HashMap<[u8; 16], RuntimeReportRecord>> {
        sqlx::query("SELECT device, record FROM runtimes")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| {
                Ok((
                    fixed("runtimes", &blob(row, 0)?)?,
                    decode("runtimes", &blob(row, 1)?)?,
                ))
            })
            .collect()
    }
}
