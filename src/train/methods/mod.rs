//! One [`TrainMethod`](super::run_loop::TrainMethod) per file: what each fine-tuning method
//! computes and updates inside the shared step loop. The train stage sets them up (models,
//! items, resumed state) and writes their artifacts; `bench` drives the same steps.

pub mod dreambooth;
pub mod hypernetwork;
pub mod joint;
pub mod lora;
pub mod textual_inversion;

pub use dreambooth::DreamboothSteps;
pub use hypernetwork::HyperSteps;
pub use lora::LoraSteps;
pub use textual_inversion::TiSteps;
