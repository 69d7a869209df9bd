//! sdpipe: fine-tune Stable Diffusion from declarative, cached TOML pipelines.

pub mod diffusion;
pub mod render;
