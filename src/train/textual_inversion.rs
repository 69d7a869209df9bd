//! Textual inversion: only the new token's input vectors train; the text encoder runs forward
//! and backward with its weights frozen, and so does the UNet.

use dfdx::prelude::*;

use super::lora::LoraTrainError;
use super::mixed;
use crate::diffusion::nn::{Elem, Tensor2, Tensor4};
use crate::diffusion::schedulers::Ddpm;
use crate::diffusion::{TextEncoder, UNet};

/// The loss of one batch and the gradient of the trainable vectors `extra` (`[k, d]`, the
/// rows of the token ids past the vocabulary; `ids` are the captions' token ids), with the UNet
/// computing in `E` (f32, or f16 in mixed precision): the text encoder (f32) gives the
/// context, the UNet's backward pass (its loss times `loss_scale`) gives the context's
/// gradient, which is unscaled in f32 and carried back through the text encoder to `extra`. The gradient may hold non-finite values after an f16 overflow (the caller skips
/// the step).
#[allow(clippy::too_many_arguments)]
pub fn loss_and_grad<E: Elem, D: Device<f32> + Device<E>>(
    text_encoder: &TextEncoder<D>,
    unet: &UNet<D, E>,
    ddpm: &Ddpm,
    ids: &[Vec<u32>],
    extra: &Tensor2<D>,
    clip_skip: usize,
    latents: &Tensor4<D>,
    noise: &Tensor4<D>,
    timesteps: &[usize],
    loss_scale: f32,
) -> Result<(f32, Tensor2<D>), LoraTrainError> {
    let embeds = text_encoder.embed_tokens_with_extra(ids, extra.leaky_trace())?;
    let (context, te_tape) = text_encoder.forward_embeds(embeds, clip_skip)?.split_tape();
    let context_e = context.clone().to_dtype::<E>();
    let (value, grads) = mixed::loss_and_grads(
        unet, ddpm, latents, noise, timesteps, &context_e, loss_scale,
    )?;
    let g_context = grads.get(&context_e).to_dtype::<f32>() * (1.0 / loss_scale);
    drop(grads);
    let grads = (context.put_tape(te_tape) * g_context).sum().backward();
    Ok((value, grads.get(extra)))
}
