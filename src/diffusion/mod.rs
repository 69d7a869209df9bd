//! The diffusion core: Stable Diffusion 1.x on dfdx (text encoder, UNet, VAE, schedulers),
//! generic over the device so the same code runs on the CPU (tests, CI) and on CUDA.
//!
//! Models: [`clip::TextEncoder`], [`unet::UNet`], [`vae::Vae`], each with a config struct
//! whose defaults are SD 1.5's. Weights: [`checkpoint::Checkpoint`] opens a diffusers folder or a
//! single-file checkpoint; [`checkpoint::StableDiffusion`] holds the three loaded models.
//!
//! Conventions: parameters are plain (un-taped) dfdx tensors; activations may carry a tape
//! (`T: Tape<f32, D>`), so gradients reach inputs (latents, text embeddings) and anything
//! trained outside the frozen weights. Model forwards validate their inputs and return
//! [`error::DiffusionError`]s.

pub mod attention;
pub mod checkpoint;
pub mod clip;
pub mod error;
pub mod host_tensor;
pub mod hypernetwork;
pub mod nn;
pub mod params;
pub mod recompute;
pub mod resnet;
pub mod schedulers;
pub mod text_to_image;
pub mod tokenizer;
pub mod unet;
pub mod vae;

pub use checkpoint::{Checkpoint, CheckpointLayout, StableDiffusion};
pub use clip::{ClipConfig, TextEncoder, TextEncoderOutput};
pub use error::{DiffusionError, Result};
pub use unet::{Conditioning, UNet, UNetConfig};
pub use vae::{LatentDistribution, Vae, VaeConfig};
