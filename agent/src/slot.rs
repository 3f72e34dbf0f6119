//! The models serving requests, one version per model name, each swappable while requests are
//! in flight.
//!
//! A request takes an `Arc` of its model's active version when it starts and finishes on that model; a swap
//! only changes which model the *next* request takes. So no request is dropped or fails because
//! of a swap, and the old model is freed when its last request ends.

use std::sync::{Arc, RwLock};

use outpost_protocol::drift::Profile;
use outpost_protocol::Sha256;

use outpost_model::drift::Extractor;
use outpost_model::inference::LoadedModel;

/// A model version's drift profile, resolved against the model for the inference path.
#[derive(Debug)]
pub struct ModelDrift {
    pub profile: Profile,
    /// SHA-256 of the profile artifact, which keys every summary made with it.
    pub sha256: Sha256,
    pub extractor: Extractor,
}

/// A committed model version, loaded and ready.
#[derive(Debug)]
pub struct ActiveModel {
    pub name: String,
    pub version: u64,
    /// SHA-256 of the signed manifest it came from.
    pub manifest_sha256: Sha256,
    pub model: LoadedModel,
    /// Present when the manifest signs a drift profile.
    pub drift: Option<ModelDrift>,
    /// Why a runtime preferred to the one serving the model was passed over (see
    /// `outpost_model::inference::Runtimes`); reported to the hub.
    pub runtime_fallback: Option<String>,
}

/// Holds the active version of every model the agent serves, one per name. Cheap to read on
/// every request.
#[derive(Debug, Default)]
pub struct ModelSlot {
    current: RwLock<Vec<Arc<ActiveModel>>>,
}

impl ModelSlot {
    pub fn new() -> ModelSlot {
        ModelSlot::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<ActiveModel>>> {
        // A poisoned lock only means a writer panicked mid-swap; each entry is a whole Arc
        // either way, so serving it is safe.
        match self.current.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The version of model `name` new requests should use, if it is served.
    pub fn get(&self, name: &str) -> Option<Arc<ActiveModel>> {
        self.read().iter().find(|model| model.name == name).cloned()
    }

    /// Every model served, by name.
    pub fn all(&self) -> Vec<Arc<ActiveModel>> {
        self.read().clone()
    }

    /// Stops serving model `name` (its retirement): new requests for it are refused, requests
    /// under way finish on the version they took. Returns the version it served.
    pub fn remove(&self, name: &str) -> Option<Arc<ActiveModel>> {
        let mut guard = match self.current.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let index = guard.iter().position(|served| served.name == name)?;
        Some(guard.remove(index))
    }

    /// Makes `model` the version of its name new requests use, returning the one it replaces.
    /// Other models are not touched.
    pub fn swap(&self, model: Arc<ActiveModel>) -> Option<Arc<ActiveModel>> {
        let mut guard = match self.current.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        match guard.iter_mut().find(|served| served.name == model.name) {
            Some(served) => Some(std::mem::replace(served, model)),
            None => {
                let at = guard.partition_point(|served| served.name < model.name);
                guard.insert(at, model);
                None
            }
        }
    }
}
