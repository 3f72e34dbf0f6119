//! Rollout records, one per plan sequence.

use super::*;

impl Store {
    // Rollouts.

    pub fn put_rollout(&self, record: &RolloutRecord) -> Result<()> {
        self.rollouts
            .insert(record.sequence.to_be_bytes(), encode("rollouts", record)?)?;
        Ok(())
    }

    pub fn rollout(&self, sequence: u64) -> Result<Option<RolloutRecord>> {
        self.rollouts
            .get(sequence.to_be_bytes())?
            .map(|bytes| decode("rollouts", &bytes))
            .transpose()
    }

    /// Every rollout, oldest first.
    pub fn rollouts(&self) -> Result<Vec<RolloutRecord>> {
        self.rollouts
            .iter()
            .values()
            .map(|bytes| decode("rollouts", &bytes?))
            .collect()
    }
}
