//! The evaluation loss a run reports before and after training: the same items, noise and
//! timesteps every time, so the two figures (and those of other methods) compare.

use std::collections::HashMap;

use anyhow::Context as _;
use dfdx::prelude::*;

use super::batch::{Item, mix};
use crate::diffusion::UNet;
use crate::diffusion::nn::{Elem, Tensor3};
use crate::diffusion::schedulers::{Ddpm, SeededNoise};

/// Mean loss over a fixed evaluation set: up to 8 items at their latent means, fixed noise and
/// timesteps spread over the range, no gradients; `contexts` holds the items' captions' text
/// states.
pub fn eval_loss<E: Elem, D: Device<f32> + Device<E>>(
    unet: &UNet<D, E>,
    ddpm: &Ddpm,
    items: &[Item],
    contexts: &HashMap<String, Tensor3<D>>,
    scaling: f32,
    seed: u64,
) -> anyhow::Result<f32> {
    eval_loss_with(
        unet,
        ddpm,
        items,
        &mut |caption| {
            contexts
                .get(caption)
                .cloned()
                .context("caption not encoded")
        },
        scaling,
        seed,
    )
}

/// [`eval_loss`] with the text states from `context_of(caption)`, `[1, 77, d]` (a method's
/// current text encoder or embedding, for the validation loss during training).
pub fn eval_loss_with<E: Elem, D: Device<f32> + Device<E>>(
    unet: &UNet<D, E>,
    ddpm: &Ddpm,
    items: &[Item],
    context_of: &mut dyn FnMut(&str) -> anyhow::Result<Tensor3<D>>,
    scaling: f32,
    seed: u64,
) -> anyhow::Result<f32> {
    let n = items.len().min(8);
    let mut total = 0.0f32;
    for (i, item) in items.iter().take(n).enumerate() {
        let [c, h, w] = item.shape;
        let mut noise_src = SeededNoise::new(mix(seed, u64::MAX, i as u64));
        let latents: Vec<f32> = item.mean.iter().map(|m| m * scaling).collect();
        let noise: Vec<f32> = (0..latents.len())
            .map(|_| noise_src.next_normal() as f32)
            .collect();
        let t = 50 + (900 * i) / n.max(1);
        let context = context_of(&item.caption)?;
        let dev = context.device().clone();
        let latents = dev.tensor_from_vec(latents, (1, c, h, w));
        let noise = dev.tensor_from_vec(noise, (1, c, h, w));
        total += super::objective::eval_loss(
            unet,
            ddpm,
            &latents,
            &noise,
            &[t],
            context.to_dtype::<E>(),
        )?;
    }
    Ok(total / n as f32)
}
