//! Retirements, one per plan sequence: the signed word that a model leaves the devices a
//! selector picks, kept as the operator signed it. They share the plans' sequence space, so a
//! retirement's sequence is never a rollout's.

use super::*;

impl Store {
    // Retirements.

    pub fn put_retirement(&self, record: &RetirementRecord) -> Result<()> {
        self.retirements.insert(
            record.sequence.to_be_bytes(),
            encode("retirements", record)?,
        )?;
        Ok(())
    }

    /// Every retirement, oldest first.
    pub fn retirements(&self) -> Result<Vec<RetirementRecord>> {
        self.retirements
            .iter()
            .values()
            .map(|bytes| decode("retirements", &bytes?))
            .collect()
    }
}
