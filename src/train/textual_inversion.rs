//! Textual inversion: only the new token's input vectors train; the text encoder runs forward
//! and backward with its weights frozen, and so does the UNet.

use dfdx::prelude::*;

use super::lora::LoraTrainError;
use crate::diffusion::nn::{Tensor2, Tensor4};
use crate::diffusion::schedulers::Ddpm;
use crate::diffusion::{TextEncoder, UNet};

/// The loss of one batch and the gradient of the trainable vectors `extra` (`[k, d]`, the
/// rows of the token ids past the vocabulary). `ids` are the captions' token ids.
#[allow(clippy::too_many_arguments)]
pub fn loss_and_grad<D: Device<f32>>(
    text_encoder: &TextEncoder<D>,
    unet: &UNet<D>,
    ddpm: &Ddpm,
    ids: &[Vec<u32>],
    extra: &Tensor2<D>,
    clip_skip: usize,
    latents: &Tensor4<D>,
    noise: &Tensor4<D>,
    timesteps: &[usize],
) -> Result<(f32, Tensor2<D>), LoraTrainError> {
    let embeds = text_encoder.embed_tokens_with_extra(ids, extra.leaky_trace())?;
    let context = text_encoder.forward_embeds(embeds, clip_skip)?;
    let noisy = ddpm.add_noise(latents, noise, timesteps)?;
    let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
    let pred = unet.forward(noisy.retaped(), &t, context)?;
    let loss = mse_loss(pred, noise.clone());
    let value = loss.as_vec().first().copied().unwrap_or(f32::NAN);
    if !value.is_finite() {
        return Err(LoraTrainError::NonFinite(value));
    }
    let grads = loss.backward();
    Ok((value, grads.get(extra)))
}
