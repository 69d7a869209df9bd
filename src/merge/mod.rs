//! Model arithmetic on host tensors: a LoRA merged into a checkpoint, several LoRAs combined
//! into one, a LoRA extracted from a fine-tuned checkpoint and its base, and A1111's checkpoint
//! weighted sum and add difference. The `merge` stage (`crate::stages`) drives these and writes
//! the results with [`crate::formats::checkpoint::write_single_file`] or
//! [`crate::formats::lora::write_kohya`].
//!
//! * [`lora_into_checkpoint`]: `W + w · alpha/rank · up·down` for every module of every LoRA.
//! * [`combine_loras`](mod@combine_loras): concatenated ranks (exact) or an SVD of the summed update.
//! * [`extract_lora`](mod@extract_lora): kohya's `extract_lora_from_models` (SVD of `tuned − base`).
//! * [`checkpoint_sum`]: `(1−α)·A + α·B` and `A + α·(B − C)`.
//! * [`svd`]: the (randomised when large) truncated SVD they share.

pub mod checkpoint_sum;
pub mod combine_loras;
pub mod extract_lora;
pub mod lora_into_checkpoint;
pub mod svd;

pub use checkpoint_sum::{SumReport, add_difference, weighted_sum};
pub use combine_loras::{CombineMethod, combine_loras};
pub use extract_lora::{ExtractOptions, ExtractReport, ExtractTargets, extract_lora};
pub use lora_into_checkpoint::{known_modules, known_modules_of, merge_loras, weight_of_module};
pub use svd::{LowRank, clamp_quantile, low_rank};

/// Errors of the merge operations; each names the LoRA, module or tensor concerned.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// A LoRA module whose target weight the model lacks (a LoRA for another architecture).
    #[error(
        "LoRA `{lora}`: module `{module}` targets `{weight}`, which the model does not have (a LoRA for another architecture?); the model has e.g. {available}"
    )]
    MissingTarget {
        /// The LoRA's name (stage or file).
        lora: String,
        /// The module path.
        module: String,
        /// The weight it would change.
        weight: String,
        /// Some weights the model has.
        available: String,
    },
    /// A LoRA module whose update does not fit its target weight.
    #[error(
        "LoRA `{lora}`: module `{module}` makes an update of shape {expected:?}, but the model's `{weight}` is {found:?} (a LoRA for another architecture?)"
    )]
    TargetShape {
        /// The LoRA's name.
        lora: String,
        /// The module path.
        module: String,
        /// The weight.
        weight: String,
        /// The shape the LoRA produces.
        expected: Vec<usize>,
        /// The model's shape.
        found: Vec<usize>,
    },
    /// Two models (or LoRAs) disagree on a tensor's shape.
    #[error("tensor `{name}`: {what} has shape {a:?} but {other} has {b:?}; they cannot be merged")]
    ShapeMismatch {
        /// The tensor or module.
        name: String,
        /// The first side (`A`, `LoRA 1`).
        what: String,
        /// Its shape.
        a: Vec<usize>,
        /// The other side.
        other: String,
        /// Its shape.
        b: Vec<usize>,
    },
    /// Anything else wrong with the request (no inputs, rank 0, …).
    #[error("{0}")]
    Invalid(String),
}

/// Result type of this module.
pub type Result<T, E = MergeError> = std::result::Result<T, E>;
