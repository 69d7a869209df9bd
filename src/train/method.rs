//! The training methods a `train` stage can run.

use serde::{Deserialize, Serialize};

/// Training methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Low-rank adapters on the UNet attention projections.
    Lora,
    /// New token vectors for the text encoder (A1111 / diffusers embeddings).
    TextualInversion,
    /// Full UNet fine-tuning with prior preservation; a single-file checkpoint.
    Dreambooth,
    /// An A1111 hypernetwork on the attentions' key/value context.
    Hypernetwork,
}
