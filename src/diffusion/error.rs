//! Errors of the diffusion core: every message names the file, tensor or setting at fault.

use std::path::PathBuf;

/// Result alias of the diffusion core.
pub type Result<T, E = DiffusionError> = std::result::Result<T, E>;

/// What can go wrong while loading or running the SD 1.x models.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    /// A file or folder could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file whose header or data is unreadable (typically a truncated download).
    #[error("{path} is not a valid safetensors file (truncated or corrupt?): {reason}")]
    CorruptFile {
        /// The file.
        path: PathBuf,
        /// What the parser found.
        reason: String,
    },
    /// A tensor the model needs is not in the weights.
    #[error("tensor `{name}` is missing from {source_desc}")]
    MissingTensor {
        /// The tensor's name (diffusers naming).
        name: String,
        /// The file(s) searched.
        source_desc: String,
    },
    /// A tensor has another shape than the configured architecture needs.
    #[error("tensor `{name}` in {source_desc} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor's name (diffusers naming).
        name: String,
        /// The file it came from.
        source_desc: String,
        /// The shape the architecture needs.
        expected: Vec<usize>,
        /// The shape stored in the file.
        found: Vec<usize>,
    },
    /// A tensor is stored in a dtype that cannot be converted to f32 weights.
    #[error(
        "tensor `{name}` in {source_desc} has dtype {dtype}; weights must be F32, F16, BF16 or F64"
    )]
    UnsupportedDtype {
        /// The tensor's name.
        name: String,
        /// The file it came from.
        source_desc: String,
        /// The dtype found.
        dtype: String,
    },
    /// The checkpoint is not a Stable Diffusion 1.x model.
    #[error(
        "unsupported architecture in {path}: {found}. sdpipe supports Stable Diffusion 1.x \
         checkpoints (CLIP ViT-L text encoder, 768-wide cross-attention, KL VAE)"
    )]
    UnsupportedArchitecture {
        /// The checkpoint (file or folder).
        path: PathBuf,
        /// What was found that is not SD 1.x.
        found: String,
    },
    /// A `config.json` that is missing a field, is not JSON, or describes an impossible model.
    #[error("invalid model config {path}: {reason}")]
    Config {
        /// The config file (or checkpoint whose inferred config is wrong).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A model input with a shape or value the model cannot take.
    #[error("invalid input to {model}: {reason}")]
    Input {
        /// The model or layer.
        model: &'static str,
        /// What is wrong.
        reason: String,
    },
}
