//! Training foundations shared by the LoRA, textual-inversion, hypernetwork and DreamBooth
//! stages: the AdamW optimiser with gradient clipping ([`optim`]) and learning-rate schedules
//! ([`lr`]).

pub mod hypernetwork;
pub mod lora;
pub mod lr;
pub mod mixed;
pub mod optim;
pub mod textual_inversion;
