//! One micro-batch through the UNet and, when it trains too, the text encoder: what LoRA (with
//! `text_encoder = true`) and DreamBooth (with `train_text_encoder`) share.

use std::collections::BTreeMap;

use dfdx::prelude::*;

use crate::diffusion::host_tensor::HostTensor;
use crate::diffusion::nn::{Elem, Tensor3};
use crate::diffusion::schedulers::Ddpm;
use crate::diffusion::{TextEncoder, UNet};
use crate::train::batch::Batch;
use crate::train::mixed::{self, StepScaler};
pub use crate::train::text::TextInputs;

/// The gradients of one micro-batch, by part.
pub struct JointGrads {
    /// The mean loss.
    pub loss: f32,
    /// The UNet's trained tensors' gradients, unscaled.
    pub unet: BTreeMap<String, HostTensor>,
    /// The text encoder's (empty when it does not train).
    pub text_encoder: BTreeMap<String, HostTensor>,
}

/// The loss and gradients of the micro-batch `batch`, the UNet computing in `E`
/// with the loss scaled by `scaler`. With a `text_encoder` the states come from it, traced, in
/// two backward passes: the UNet's gives the context's gradient (unscaled here), which the
/// encoder's own pass, in f32, carries to its weights. `unet_grads` and `te_grads` name the
/// gradients each part trains: every tensor for DreamBooth, the adapters for LoRA. The
/// encoder's token embeddings join the tape only when they are trainable.
#[allow(clippy::too_many_arguments)]
pub fn joint_grads<D: Device<f32> + Device<E>, E: Elem>(
    unet: &mut UNet<D, E>,
    text_encoder: Option<&mut TextEncoder<D>>,
    ddpm: &Ddpm,
    batch: &Batch<D>,
    text: &TextInputs<'_, D>,
    scaler: &mut StepScaler,
    unet_grads: impl FnOnce(&mut UNet<D, E>, &Gradients<E, D>) -> BTreeMap<String, HostTensor>,
    te_grads: impl FnOnce(&mut TextEncoder<D>, &Gradients<f32, D>) -> BTreeMap<String, HostTensor>,
) -> anyhow::Result<JointGrads> {
    let scale = scaler.scale();
    let loss_and_grads = |unet: &UNet<D, E>, context: &Tensor3<D, NoneTape, E>| {
        mixed::loss_and_grads(
            unet,
            ddpm,
            &batch.latents,
            &batch.noise,
            &batch.timesteps,
            context,
            scale,
        )
    };
    let Some(te) = text_encoder else {
        let context = text.batch_context(&batch.captions)?.to_dtype::<E>();
        let (loss, grads) = loss_and_grads(unet, &context)?;
        let mut unet = unet_grads(unet, &grads);
        scaler.unscale(&mut unet);
        return Ok(JointGrads {
            loss,
            unet,
            text_encoder: BTreeMap::new(),
        });
    };
    let ids = text.batch_ids(&batch.captions)?;
    let embeds = te.embed_tokens_traced(&ids)?;
    let (context, te_tape) = te.forward_embeds(embeds, text.clip_skip)?.split_tape();
    let context_e = context.clone().to_dtype::<E>();
    let (loss, grads) = loss_and_grads(unet, &context_e)?;
    let mut unet = unet_grads(unet, &grads);
    let g_context = grads.get(&context_e).to_dtype::<f32>() * (1.0 / scale);
    drop(grads);
    scaler.unscale(&mut unet);
    let te_backward = (context.put_tape(te_tape) * g_context).sum().backward();
    let text_encoder = te_grads(te, &te_backward);
    scaler.note_finite(text_encoder.values());
    Ok(JointGrads {
        loss,
        unet,
        text_encoder,
    })
}

/// The evaluation loss ([`crate::train::eval::eval_loss_with`]) of `items` through `unet` with
/// the text states of the current `text_encoder` when it trains, else the frozen ones of `text`:
/// the validation loss of LoRA and DreamBooth during training.
pub fn validation_loss<D: Device<f32> + Device<E>, E: Elem>(
    unet: &UNet<D, E>,
    text_encoder: Option<&TextEncoder<D>>,
    text: &TextInputs<'_, D>,
    ddpm: &Ddpm,
    items: &[crate::train::batch::Item],
    (scaling, seed): (f32, u64),
) -> anyhow::Result<f32> {
    let mut context_of = |caption: &str| -> anyhow::Result<crate::diffusion::nn::Tensor3<D>> {
        let captions = [caption.to_string()];
        match text_encoder {
            Some(te) => Ok(te.encode(&text.batch_ids(&captions)?, text.clip_skip)?),
            None => text.batch_context(&captions),
        }
    };
    crate::train::eval::eval_loss_with(unet, ddpm, items, &mut context_of, scaling, seed)
}
