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
    /// LoRA on the ResNets' and samplers' convolutions too (kohya's LoCon, LyCORIS `locon`).
    Locon,
    /// LyCORIS LoHa: a Hadamard product of two low-rank products.
    Loha,
    /// LyCORIS LoKr: a Kronecker product with a low-rank factor.
    Lokr,
    /// DoRA: LoRA with a learned magnitude per weight column.
    Dora,
}

impl Method {
    /// Whether the method trains a LoRA-family network (the `[stage.NAME.lora]` table; a
    /// `lora.safetensors` artifact).
    pub fn is_network(self) -> bool {
        matches!(
            self,
            Method::Lora | Method::Locon | Method::Loha | Method::Lokr | Method::Dora
        )
    }
}
