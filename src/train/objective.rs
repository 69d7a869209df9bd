//! The diffusion training objective, one for every method, `bench` and `pretrain`: noise the
//! latents at the drawn timesteps (`x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε`), ask the UNet for what the
//! scheduler's `prediction_type` says it predicts (ε, v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀, or x₀, as
//! diffusers' `DDPMScheduler` and its training examples define the target), and take the mean
//! squared error over every element, or, with a [`LossWeighting`](crate::diffusion::schedulers::LossWeighting) on the [`Ddpm`], each
//! sample's mean squared error times its timestep's weight, averaged over the batch (as
//! diffusers and kohya apply min-SNR). Evaluation losses stay unweighted, so runs with
//! different weightings compare on one scale.

use dfdx::losses::mse_loss;
use dfdx::prelude::*;

use crate::diffusion::nn::Tensor4;
use crate::diffusion::nn::elem::{Elem, to_f32_vec};
use crate::diffusion::schedulers::{Ddpm, SchedulerError};
use crate::diffusion::{Conditioning, UNet};

/// Why the objective could not give a loss.
#[derive(Debug, thiserror::Error)]
pub enum ObjectiveError {
    /// The model rejected its inputs.
    #[error(transparent)]
    Model(#[from] crate::diffusion::DiffusionError),
    /// The noise schedule rejected its inputs (a timestep out of range).
    #[error(transparent)]
    Schedule(#[from] SchedulerError),
    /// The loss is NaN or infinite.
    #[error("the loss is {0}: training diverged (lower the learning rate)")]
    NonFinite(f32),
}

/// The UNet's prediction `[b, c, h, w]` (in `E`, on the tape `T`) and its f32 target.
pub type PredictionAndTarget<D, T, E> = (Tensor4<D, T, E>, Tensor4<D>);

/// The UNet's prediction for one batch, on the tape of the conditioning (none for an
/// evaluation), and its target in f32: the UNet computes in `E` on the noisy latents converted
/// from f32, the target is the scheduler's [`Ddpm::training_target`].
pub fn prediction_and_target<E: Elem, D: Device<f32> + Device<E>, T: Tape<E, D>>(
    unet: &UNet<D, E>,
    ddpm: &Ddpm,
    latents: &Tensor4<D>,
    noise: &Tensor4<D>,
    timesteps: &[usize],
    conditioning: impl Into<Conditioning<D, T, E>>,
) -> Result<PredictionAndTarget<D, T, E>, ObjectiveError> {
    // [b, c, h, w]
    let noisy = ddpm.add_noise(latents, noise, timesteps)?.to_dtype::<E>();
    let target = ddpm.training_target(latents, noise, timesteps)?;
    let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
    let pred = unet.forward(noisy.retaped::<T>(), &t, conditioning)?;
    Ok((pred, target))
}

/// The training loss of one batch on the tape of the conditioning, computed in `E`:
/// `mse(unet(x_t, t, conditioning), target)`, each sample weighted by
/// [`Ddpm::loss_weights`] when the weighting is not uniform.
pub fn loss<E: Elem, D: Device<f32> + Device<E>, T: Tape<E, D>>(
    unet: &UNet<D, E>,
    ddpm: &Ddpm,
    latents: &Tensor4<D>,
    noise: &Tensor4<D>,
    timesteps: &[usize],
    conditioning: impl Into<Conditioning<D, T, E>>,
) -> Result<Tensor<(), E, D, T>, ObjectiveError> {
    let (pred, target) =
        prediction_and_target(unet, ddpm, latents, noise, timesteps, conditioning)?;
    let Some(weights) = ddpm.loss_weights(timesteps)? else {
        return Ok(mse_loss(pred, target.to_dtype::<E>()));
    };
    // [b]: each sample's mean squared error, then weighted and averaged over the batch.
    let per_sample = (pred - target.to_dtype::<E>())
        .square()
        .mean::<(usize,), Axes3<1, 2, 3>>();
    let dev = latents.device().clone();
    let weights = dev
        .tensor_from_vec(weights, (timesteps.len(),))
        .to_dtype::<E>();
    Ok((per_sample * weights).mean())
}

/// The loss of one batch (unscaled, in f32) and the gradients of `loss · loss_scale`: every
/// tensor on the tape keeps its gradient, so `grads.get(context)` is the context's and the
/// trained parameters' are read by name. A non-finite loss is an error before any backward.
pub fn loss_and_grads<E: Elem, D: Device<f32> + Device<E>>(
    unet: &UNet<D, E>,
    ddpm: &Ddpm,
    latents: &Tensor4<D>,
    noise: &Tensor4<D>,
    timesteps: &[usize],
    conditioning: impl Into<Conditioning<D, OwnedTape<E, D>, E>>,
    loss_scale: f32,
) -> Result<(f32, Gradients<E, D>), ObjectiveError> {
    let loss = loss(unet, ddpm, latents, noise, timesteps, conditioning)?;
    let value = to_f32_vec(&loss).first().copied().unwrap_or(f32::NAN);
    if !value.is_finite() {
        return Err(ObjectiveError::NonFinite(value));
    }
    let loss = if loss_scale == 1.0 {
        loss
    } else {
        loss * E::of(loss_scale)
    };
    Ok((value, loss.backward()))
}

/// The loss of one batch without gradients (evaluation), the error taken in f32 whatever the
/// UNet computes in.
pub fn eval_loss<E: Elem, D: Device<f32> + Device<E>>(
    unet: &UNet<D, E>,
    ddpm: &Ddpm,
    latents: &Tensor4<D>,
    noise: &Tensor4<D>,
    timesteps: &[usize],
    conditioning: impl Into<Conditioning<D, NoneTape, E>>,
) -> Result<f32, ObjectiveError> {
    let (pred, target) =
        prediction_and_target(unet, ddpm, latents, noise, timesteps, conditioning)?;
    let loss = mse_loss(pred.to_dtype::<f32>(), target);
    Ok(loss.as_vec().first().copied().unwrap_or(f32::NAN))
}
