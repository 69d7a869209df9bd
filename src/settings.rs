//! `[pipeline]`: settings shared by every stage.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::device::{DeviceChoice, Precision};

/// The `[pipeline]` table, defaulted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Name of the pipeline; outputs go to `outputs/<name>/`. Defaults to the file stem.
    #[serde(default)]
    pub name: String,
    /// Seed every stage derives its randomness from.
    #[serde(default)]
    pub seed: u64,
    /// Base checkpoint (single-file `.safetensors` or diffusers folder), relative to the file.
    #[serde(default)]
    pub base_model: Option<PathBuf>,
    /// A diffusers-style folder whose `unet/`, `vae/`, `text_encoder/` `config.json` files
    /// describe the architecture of a single-file `base_model` (only needed for models whose
    /// shape cannot be inferred from the tensors, like the tiny test models). Relative to the file.
    #[serde(default)]
    pub model_config: Option<PathBuf>,
    /// Where model stages run.
    #[serde(default)]
    pub device: DeviceChoice,
    /// Float type of model stages.
    #[serde(default)]
    pub precision: Precision,
}
