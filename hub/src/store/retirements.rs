//! Retirements, one per plan sequence: the signed word that a model leaves the devices a
//! selector picks, kept as the operator signed it. They share the plans' sequence space, so a
//! retirement's sequence is never a rollout's.

use super::*;

impl Store {
    // Retirements.

    pub async fn put_retirement(&self, record: &RetirementRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO retirements (sequence, record) VALUES ($1, $2) \
             ON CONFLICT (sequence) DO UPDATE SET record = excluded.record",
        )
        .bind(int("plan sequence", record.sequence)?)
        .bind(encode("retirements", record)?)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Every retirement, oldest first.
    pub async fn retirements(&self) -> Result<Vec<RetirementRecord>> {
        sqlx::query("SELECT record FROM retirements ORDER BY sequence")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| decode("retirements", &blob(row, 0)?))
            .collect()
    }
}
