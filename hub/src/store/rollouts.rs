//! Rollout records, one per plan sequence.

use super::*;

impl Store {
    // Rollouts.

    pub async fn put_rollout(&self, record: &RolloutRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO rollouts (sequence, record) VALUES ($1, $2) \
             ON CONFLICT (sequence) DO UPDATE SET record = excluded.record",
        )
        .bind(int("plan sequence", record.sequence)?)
        .bind(encode("rollouts", record)?)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    pub async fn rollout(&self, sequence: u64) -> Result<Option<RolloutRecord>> {
        let Ok(sequence) = i64::try_from(sequence) else {
            return Ok(None);
        };
        sqlx::query("SELECT record FROM rollouts WHERE sequence = $1")
            .bind(sequence)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| decode("rollouts", &blob(&row, 0)?))
            .transpose()
    }

    /// Every rollout, oldest first.
    pub async fn rollouts(&self) -> Result<Vec<RolloutRecord>> {
        sqlx::query("SELECT record FROM rollouts ORDER BY sequence")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| decode("rollouts", &blob(row, 0)?))
            .collect()
    }
}
