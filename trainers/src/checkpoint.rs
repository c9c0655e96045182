//! Checkpoints: model weights in burn's `.bpk` format (burn-store's
//! `BurnpackStore`), optimizer state as burn's `OptimizerRecord`, and the
//! loop's own state (step, phase, RNG, metrics so far) as JSON, all in one
//! directory. A run that finds a checkpoint in its output directory resumes
//! from it.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::{BurnpackStore, ModuleSnapshot};

use crate::TrainError;

/// A checkpoint directory (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    dir: PathBuf,
}

impl Checkpoint {
    /// Checkpoints under `dir` (created on the first save).
    pub fn new(dir: impl AsRef<Path>) -> Self {
        Checkpoint {
            dir: dir.as_ref().to_path_buf(),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Saves `model`'s weights as `NAME.bpk`.
    ///
    /// # Errors
    ///
    /// [`TrainError::Io`] if writing fails.
    pub fn save_model<M: Module>(&self, name: &str, model: &M) -> Result<(), TrainError> {
        std::fs::create_dir_all(&self.dir)?;
        let mut store =
            BurnpackStore::from_file(self.dir.join(format!("{name}.bpk"))).overwrite(true);
        model
            .save_into(&mut store)
            .map_err(|e| TrainError::Io(format!("saving {name}: {e}")))
    }

    /// Loads `NAME.bpk` into `model` (same architecture); `Ok(None)` when
    /// there is no such file.
    ///
    /// # Errors
    ///
    /// [`TrainError::Io`] if the file exists but does not fit the model.
    pub fn load_model<M: Module>(&self, name: &str, mut model: M) -> Result<Option<M>, TrainError> {
        let path = self.dir.join(format!("{name}.bpk"));
        if !path.exists() {
            return Ok(None);
        }
        let mut store = BurnpackStore::from_file(&path);
        model
            .load_from(&mut store)
            .map_err(|e| TrainError::Io(format!("loading {}: {e}", path.display())))?;
        Ok(Some(model))
    }

    /// Saves the loop state as `state.json`.
    ///
    /// # Errors
    ///
    /// [`TrainError::Io`] if writing fails.
    pub fn save_state(&self, state: &serde_json::Value) -> Result<(), TrainError> {
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join("state.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(state).map_err(|e| TrainError::Io(e.to_string()))?,
        )?;
        std::fs::rename(tmp, self.dir.join("state.json"))?;
        Ok(())
    }

    /// The saved loop state, if any.
    ///
    /// # Errors
    ///
    /// [`TrainError::Io`] for an unreadable or malformed file.
    pub fn load_state(&self) -> Result<Option<serde_json::Value>, TrainError> {
        let path = self.dir.join("state.json");
        if !path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path)?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))
    }

    /// Saves an optimizer's state as `NAME.optim`.
    pub(crate) fn save_optim(&self, name: &str, optim: &crate::Optim) -> Result<(), TrainError> {
        std::fs::create_dir_all(&self.dir)?;
        optim
            .0
            .to_record()
            .save(self.dir.join(format!("{name}.optim")))
            .map_err(|e| TrainError::Io(format!("saving optimizer {name}: {e:?}")))
    }

    /// Loads `NAME.optim` into an optimizer (no-op when missing).
    pub(crate) fn load_optim(
        &self,
        name: &str,
        optim: &mut crate::Optim,
    ) -> Result<(), TrainError> {
        let path = self.dir.join(format!("{name}.optim"));
        if !path.exists() {
            return Ok(());
        }
        let rec = burn::optim::OptimizerRecord::load(&path)
            .map_err(|e| TrainError::Io(format!("loading {}: {e:?}", path.display())))?;
        let o = std::mem::replace(&mut optim.0, burn::optim::AdamWConfig::new().init());
        optim.0 = o.load_record(rec);
        Ok(())
    }
}
