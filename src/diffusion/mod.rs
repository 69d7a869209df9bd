//! The diffusion core: Stable Diffusion 1.x on dfdx (text encoder, UNet, VAE, schedulers),
//! generic over the device so the same code runs on the CPU (tests, CI) and on CUDA.

pub mod error;
pub mod nn;
pub mod weights;
pub mod clip;
pub mod attention;
pub mod resnet;
pub mod unet_blocks;
pub mod unet;
pub mod vae;
