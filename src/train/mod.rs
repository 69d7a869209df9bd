//! Training foundations shared by the LoRA, textual-inversion, hypernetwork and DreamBooth
//! stages, `bench` and `pretrain`: the diffusion [`objective`] (target from the scheduler's
//! prediction type), the AdamW optimiser with gradient clipping ([`optim`]) and learning-rate
//! schedules ([`lr`]).

pub mod batch;
pub mod captions;
pub mod ema;
pub mod eval;
pub mod hypernetwork;
pub mod lora;
pub mod lr;
pub mod lycoris;
mod method;
pub mod methods;
mod metrics;
pub mod mixed;
pub mod noise;
pub mod objective;
pub mod optim;
pub mod resume;
pub mod run_loop;
pub mod text;
pub mod textual_inversion;
pub mod timesteps;

pub use method::Method;
pub use metrics::{TrainMetrics, peak_memory_mib};
