//! Running a pretraining stage: the VAE phase, then the UNet and text-encoder phase, with
//! checkpoints that resume to the same bytes.

use crate::stages::artifact::Artifact;
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, bail};
use dfdx::prelude::*;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::diffusion::checkpoint::single_file::StoredConfigs;
use crate::diffusion::nn::Tensor4;
use crate::diffusion::nn::weights::{Loader, WeightStore};
use crate::diffusion::params::{count_params, named_tensors, set_trainable};
use crate::diffusion::schedulers::{Ddpm, SchedulerConfig, SeededNoise};
use crate::diffusion::tokenizer::ClipTokenizer;
use crate::diffusion::vae::VaeConfig;
use crate::diffusion::{TextEncoder, UNet, Vae};
use crate::formats::checkpoint::{ModelTensors, write_single_file};
use crate::formats::{read_safetensors, write_safetensors};
use crate::stages::context::{StageContext, StageResult};
use crate::train::batch::mix;
use crate::train::lr::LrSchedule;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::peak_memory_mib;
use crate::train::resume::load_weights;
use crate::train::resume::{self, ResumeState, read_state};
use crate::train::run_loop::step as train_step;

/// Resume state of a pretraining run.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PretrainState {
    /// Steps done over both phases (VAE steps first).
    step: u64,
    vae_losses: Vec<f32>,
    losses: Vec<f32>,
    /// Set when the VAE phase ended.
    scaling_factor: Option<f64>,
}

impl ResumeState for PretrainState {
    fn step(&self) -> u64 {
        self.step
    }
}

/// The loss figures of a pretraining run (the record's stats).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainMetrics {
    /// VAE steps.
    pub vae_steps: u64,
    /// UNet + text-encoder steps.
    pub unet_steps: u64,
    /// Mean VAE loss over the first and the last tenth of its steps.
    pub vae_loss_first: f32,
    /// See `vae_loss_first`.
    pub vae_loss_last: f32,
    /// Reconstruction PSNR (dB) of the trained VAE on 32 held-out images.
    pub vae_psnr_db: f64,
    /// The latent scaling factor found.
    pub scaling_factor: f64,
    /// Mean diffusion loss over the first and the last tenth of its steps.
    pub train_loss_first: f32,
    /// See `train_loss_first`.
    pub train_loss_last: f32,
    /// Wall time of this process's training loop.
    pub wall_s: f64,
    /// Steps per second in this process (both phases).
    pub steps_per_s: f64,
    /// Wall time of the VAE phase in this process.
    pub vae_wall_s: f64,
    /// Wall time of the UNet phase in this process.
    pub unet_wall_s: f64,
    /// Peak resident memory (MiB).
    pub peak_memory_mib: f64,
    /// Size of the saved model.
    pub artifact_bytes: u64,
    /// Parameters of the UNet, the VAE and the text encoder.
    pub params: [usize; 3],
    /// The step it resumed from (0 = fresh start).
    pub resumed_from: u64,
}

use super::phases::{DiffusionPhase, ImageBatch, Models, VaePhase, WorldBatch};
use super::{Init, PretrainParams};

impl PretrainParams {
    /// Runs both phases and writes `model.safetensors`.
    pub fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        let rt = crate::device::open(ctx.settings.device)?;
        crate::on_device!(rt, dev => self.run_on(ctx, dev))
    }

    /// [`Self::run`] on the opened device.
    fn run_on<D: Device<f32>>(
        &self,
        ctx: &StageContext<'_>,
        dev: D,
    ) -> anyhow::Result<StageResult> {
        let seed = ctx.settings.seed;
        let tokenizer = ClipTokenizer::bundled()?;
        let ddpm = Ddpm::new(&SchedulerConfig::sd15())?;
        let (mut configs, mut models) = match self.init {
            Init::Random => self.random_models(seed, &dev)?,
            Init::BaseModel => self.base_models(ctx, &dev)?,
        };
        let params = [
            count_params(&mut models.unet),
            count_params(&mut models.vae),
            count_params(&mut models.text_encoder),
        ];

        let scratch = ctx.scratch()?;
        let fresh = || {
            let cfg = AdamWConfig {
                weight_decay: self.weight_decay,
                ..AdamWConfig::default()
            };
            (
                AdamW::new(&dev, cfg),
                PretrainState {
                    step: 0,
                    vae_losses: Vec::new(),
                    losses: Vec::new(),
                    // A base model's VAE that does not train keeps its latent scaling.
                    scaling_factor: (self.init == Init::BaseModel && self.vae_steps == 0)
                        .then_some(configs.vae.scaling_factor),
                },
            )
        };
        let (mut optimizer, mut state) =
            match load_pretrain_checkpoint(&scratch, &mut models, &dev, ctx)? {
                Some(found) => found,
                None => fresh(),
            };
        let resumed_from = state.step;
        if resumed_from > 0 {
            ctx.progress.message(&format!(
                "{}: resuming from the checkpoint at step {resumed_from}",
                ctx.instance.name
            ));
        }
        let total = self.vae_steps + self.unet_steps;
        let vae_sched = LrSchedule::from_name("cosine", self.lr_warmup_steps, self.vae_steps)?;
        let unet_sched = LrSchedule::from_name("cosine", self.lr_warmup_steps, self.unet_steps)?;
        let bar = ctx
            .progress
            .bar(total, &format!("{} pretrain", ctx.instance.name));
        bar.set_position(state.step);
        let started = std::time::Instant::now();

        // Phase 1: the VAE.
        set_trainable(&mut models.vae, true);
        while state.step < self.vae_steps {
            ctx.check_cancelled()?;
            let step = state.step;
            let (images, _) = self.world_batch(mix(seed, step, 0), self.vae_batch_size, &dev);
            let noise = self.latent_noise(mix(seed, step, 1), &configs.vae, &dev);
            let batch = ImageBatch { images, noise };
            let mut phase = VaePhase {
                params: self,
                vae: &mut models.vae,
                optimizer: &mut optimizer,
            };
            let lr = vae_sched.lr_at(self.vae_lr, step);
            let loss = train_step(&mut phase, |_| batch.clone(), lr, 1, self.max_grad_norm)?.loss;
            state.vae_losses.push(loss);
            self.advance(ctx, &bar, &mut state, loss, "vae", &mut models, &optimizer)?;
        }
        set_trainable(&mut models.vae, false);
        let vae_wall_s = started.elapsed().as_secs_f64();
        let scaling = match state.scaling_factor {
            Some(s) => s,
            None => {
                let s = self.latent_scaling(&models.vae, seed, &dev)?;
                state.scaling_factor = Some(s);
                s
            }
        };
        configs.vae.scaling_factor = scaling;
        models.vae.config.scaling_factor = scaling;

        // Phase 2: the UNet and the text encoder.
        set_trainable(&mut models.unet, true);
        set_trainable(&mut models.text_encoder, true);
        while state.step < total {
            ctx.check_cancelled()?;
            let step = state.step;
            let local = step - self.vae_steps;
            let (images, captions) = self.world_batch(mix(seed, step, 0), self.batch_size, &dev);
            let post = models.vae.encode(images)?;
            let b = captions.len();
            let mut src = SeededNoise::new(mix(seed, step, 1));
            let shape = *post.mean.shape();
            let n = shape.num_elements();
            let eps: Vec<f32> = (0..n).map(|_| src.next_normal() as f32).collect();
            let latents: Vec<f32> = post
                .mean
                .as_vec()
                .iter()
                .zip(post.std.as_vec())
                .zip(&eps)
                .map(|((m, s), e)| (m + s * e) * scaling as f32)
                .collect();
            let latents = dev.tensor_from_vec(latents, shape);
            let noise: Vec<f32> = (0..n).map(|_| src.next_normal() as f32).collect();
            let noise = dev.tensor_from_vec(noise, shape);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(mix(seed, step, 2));
            let timesteps: Vec<usize> = (0..b).map(|_| rng.random_range(0..1000)).collect();
            let ids = captions
                .iter()
                .map(|c| {
                    let dropped = rng.random::<f64>() < self.caption_dropout;
                    tokenizer
                        .encode(if dropped { "" } else { c })
                        .map(|e| e.input_ids)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let batch = WorldBatch {
                latents,
                noise,
                timesteps,
                ids,
            };
            let mut phase = DiffusionPhase {
                models: &mut models,
                ddpm: &ddpm,
                optimizer: &mut optimizer,
            };
            let lr = unet_sched.lr_at(self.lr, local);
            let loss = train_step(&mut phase, |_| batch.clone(), lr, 1, self.max_grad_norm)?.loss;
            state.losses.push(loss);
            self.advance(ctx, &bar, &mut state, loss, "unet", &mut models, &optimizer)?;
        }
        set_trainable(&mut models.unet, false);
        set_trainable(&mut models.text_encoder, false);
        bar.finish_and_clear();
        let wall_s = started.elapsed().as_secs_f64();
        let unet_wall_s = wall_s - vae_wall_s;
        let psnr = self.vae_psnr(&models.vae, seed, &dev)?;

        let tensors = ModelTensors {
            unet: named_tensors(&mut models.unet),
            vae: named_tensors(&mut models.vae),
            text_encoder: named_tensors(&mut models.text_encoder),
        };
        let recipe = serde_json::json!({
            "method": "pretrain",
            "world": self.world,
            "resolution": self.resolution,
            "vae_steps": self.vae_steps,
            "unet_steps": self.unet_steps,
            "batch_size": self.batch_size,
            "seed": seed,
            "sdpipe_version": env!("CARGO_PKG_VERSION"),
        });
        let metadata = BTreeMap::from([
            ("sdpipe_train_recipe".to_string(), recipe.to_string()),
            ("format".to_string(), "pt".to_string()),
        ]);
        let out = scratch.join(Artifact::Checkpoint.file_name());
        write_single_file(&out, &tensors, &configs, self.save_dtype, &metadata)?;
        let blob = ctx.store.put_file(&out)?;

        let tenth = |v: &[f32], last: bool| {
            let k = (v.len() / 10).max(1).min(v.len());
            let part = if last { &v[v.len() - k..] } else { &v[..k] };
            part.iter().sum::<f32>() / part.len().max(1) as f32
        };
        let metrics = PretrainMetrics {
            vae_steps: self.vae_steps,
            unet_steps: self.unet_steps,
            vae_loss_first: tenth(&state.vae_losses, false),
            vae_loss_last: tenth(&state.vae_losses, true),
            vae_psnr_db: psnr,
            scaling_factor: scaling,
            train_loss_first: tenth(&state.losses, false),
            train_loss_last: tenth(&state.losses, true),
            wall_s,
            steps_per_s: (total - resumed_from) as f64 / wall_s.max(1e-9),
            vae_wall_s,
            unet_wall_s,
            peak_memory_mib: peak_memory_mib(),
            artifact_bytes: blob.size,
            params,
            resumed_from,
        };
        let mut result = StageResult::default();
        result
            .outputs
            .insert(Artifact::Checkpoint.file_name().into(), blob);
        result.outputs.insert(
            "vae_loss.json".into(),
            ctx.store
                .put_bytes(&serde_json::to_vec(&state.vae_losses)?)?,
        );
        result.outputs.insert(
            Artifact::LossCurve.file_name().into(),
            ctx.store.put_bytes(&serde_json::to_vec(&state.losses)?)?,
        );
        if let serde_json::Value::Object(mut map) = serde_json::to_value(&metrics)? {
            result.stats.append(&mut map);
        }
        result.summary = format!(
            "pretrained on the {} world: VAE {} steps (PSNR {:.1} dB), UNet + text encoder {} steps \
             (loss {:.4} → {:.4}), {:.2} steps/s, {:.1} MiB model",
            self.world,
            self.vae_steps,
            psnr,
            self.unet_steps,
            metrics.train_loss_first,
            metrics.train_loss_last,
            metrics.steps_per_s,
            metrics.artifact_bytes as f64 / (1024.0 * 1024.0)
        );
        let _ = std::fs::remove_dir_all(scratch.join("checkpoints"));
        let _ = std::fs::remove_file(&out);
        Ok(result)
    }

    /// After a step: progress, divergence check, checkpoint.
    #[allow(clippy::too_many_arguments)]
    fn advance<D: Device<f32>>(
        &self,
        ctx: &StageContext<'_>,
        bar: &indicatif::ProgressBar,
        state: &mut PretrainState,
        loss: f32,
        phase: &str,
        models: &mut Models<D>,
        optimizer: &AdamW<D>,
    ) -> anyhow::Result<()> {
        if !loss.is_finite() {
            let advice = if phase == "vae" {
                "lower `vae_lr`, or set `max_grad_norm`"
            } else {
                "lower `lr`, or set `max_grad_norm`"
            };
            return Err(crate::train::run_loop::divergence(
                loss,
                state.step,
                advice,
                &ctx.scratch()?,
            )
            .context(format!("pretraining the {phase}")));
        }
        state.step += 1;
        bar.set_position(state.step);
        bar.set_message(format!("{} {phase} loss {loss:.4}", ctx.instance.name));
        let total = self.vae_steps + self.unet_steps;
        if self.checkpoint_every > 0
            && state.step.is_multiple_of(self.checkpoint_every)
            && state.step < total
        {
            let (u, v, t) = (
                named_tensors(&mut models.unet),
                named_tensors(&mut models.vae),
                named_tensors(&mut models.text_encoder),
            );
            resume::save(&ctx.scratch()?, &*state, |dir| {
                write_safetensors(&dir.join("unet.safetensors"), &u, None)?;
                write_safetensors(&dir.join("vae.safetensors"), &v, None)?;
                write_safetensors(&dir.join("text_encoder.safetensors"), &t, None)?;
                optimizer.save(&dir.join("optimizer.safetensors"))?;
                Ok(())
            })?;
        }
        Ok(())
    }

    /// `batch_size` rendered scenes `[b, 3, r, r]` in [-1, 1] and their captions.
    /// Random initial weights (PyTorch's default ranges), the same for every run of a seed.
    fn random_models<D: Device<f32>>(
        &self,
        seed: u64,
        dev: &D,
    ) -> anyhow::Result<(StoredConfigs, Models<D>)> {
        let configs = self
            .architecture
            .clone()
            .unwrap_or_default()
            .configs(self.resolution);
        let init = WeightStore::synthetic(seed);
        let l = Loader::new(&init, dev);
        let mut models = Models {
            unet: UNet::load(&l, &configs.unet)?,
            vae: Vae::load(&l, &configs.vae)?,
            text_encoder: TextEncoder::load(&l, &configs.text_encoder)?,
        };
        small_initial_variance(&mut models.vae, dev);
        Ok((configs, models))
    }

    /// The pipeline's base model, whose architecture must take `resolution`-pixel images.
    fn base_models<D: Device<f32>>(
        &self,
        ctx: &StageContext<'_>,
        dev: &D,
    ) -> anyhow::Result<(StoredConfigs, Models<D>)> {
        let path = ctx
            .settings
            .base_model
            .as_deref()
            .context("init = \"base_model\" needs [pipeline] base_model")?;
        let ckpt = crate::diffusion::Checkpoint::open(path)
            .with_context(|| format!("opening the base model {}", path.display()))?;
        let mut configs = ckpt.configs();
        let f = configs.vae.downsampling_factor()
            * (1 << configs.unet.block_out_channels.len().saturating_sub(1));
        if !(self.resolution as usize).is_multiple_of(f) {
            bail!(
                "resolution {} is not a multiple of {f}, the base model {}'s total downsampling",
                self.resolution,
                path.display()
            );
        }
        let sd = ckpt.load(dev)?;
        configs.unet.sample_size = self.resolution as usize / configs.vae.downsampling_factor();
        configs.vae.sample_size = self.resolution as usize;
        Ok((
            configs,
            Models {
                unet: sd.unet,
                vae: sd.vae,
                text_encoder: crate::stages::train::single_text_encoder(
                    sd.text_encoders,
                    "pretrain",
                )?,
            },
        ))
    }

    fn world_batch<D: Device<f32>>(
        &self,
        seed: u64,
        n: usize,
        dev: &D,
    ) -> (Tensor4<D>, Vec<String>) {
        let r = self.resolution as usize;
        let mut data = Vec::with_capacity(n * 3 * r * r);
        let mut captions = Vec::with_capacity(n);
        for i in 0..n {
            let (img, caption) =
                crate::world::base_example(mix(seed, i as u64, 7), self.resolution);
            data.extend(crate::image::to_chw_tensor(&img));
            captions.push(caption);
        }
        (dev.tensor_from_vec(data, (n, 3, r, r)), captions)
    }

    /// N(0, 1) noise of the latent shape of a batch.
    fn latent_noise<D: Device<f32>>(&self, seed: u64, vae: &VaeConfig, dev: &D) -> Tensor4<D> {
        let h = self.resolution as usize / vae.downsampling_factor();
        let shape = (self.vae_batch_size, vae.latent_channels, h, h);
        let mut src = SeededNoise::new(seed);
        let v: Vec<f32> = (0..shape.num_elements())
            .map(|_| src.next_normal() as f32)
            .collect();
        dev.tensor_from_vec(v, shape)
    }

    /// The VAE loss of a batch and its gradients.
    pub(super) fn vae_loss<D: Device<f32>>(
        &self,
        vae: &Vae<D>,
        images: Tensor4<D>,
        eps: Tensor4<D>,
    ) -> anyhow::Result<(f32, Gradients<f32, D>)> {
        let (mean, logvar) = vae.encode_moments(images.leaky_trace())?;
        let std = (logvar.retaped::<OwnedTape<f32, D>>() * 0.5).exp();
        let z = mean.retaped::<OwnedTape<f32, D>>() + std * eps;
        let recon = vae.decode(z)?;
        let rec = if self.reconstruction == "mse" {
            mse_loss(recon, images.clone())
        } else {
            (recon - images.clone()).abs().mean()
        };
        // KL(N(m, s²) ‖ N(0, 1)) = ½ Σ (m² + s² − 1 − log s²), per image, over the pixel values.
        let (b, c, h, w) = *images.shape();
        let kl = (mean.square() + logvar.retaped::<OwnedTape<f32, D>>().exp() - logvar - 1.0)
            .sum::<Rank0, _>()
            * (0.5 / (b * c * h * w) as f32);
        let loss = rec + kl * self.kl_weight as f32;
        let value = loss.as_vec().first().copied().unwrap_or(f32::NAN);
        Ok((value, loss.backward()))
    }

    /// `1 / std` of the latent means of 64 held-out images.
    fn latent_scaling<D: Device<f32>>(
        &self,
        vae: &Vae<D>,
        seed: u64,
        dev: &D,
    ) -> anyhow::Result<f64> {
        let mut values = Vec::new();
        for k in 0..4 {
            let (images, _) = self.world_batch(mix(seed, u64::MAX - k as u64, 0), 16, dev);
            values.extend(vae.encode(images)?.mean.as_vec());
        }
        let n = values.len().max(1) as f64;
        let mean = values.iter().map(|v| *v as f64).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|v| (*v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        Ok(1.0 / var.sqrt().max(1e-6))
    }

    /// Reconstruction PSNR (dB, images in [0, 1]) of 32 held-out images at their latent means.
    fn vae_psnr<D: Device<f32>>(&self, vae: &Vae<D>, seed: u64, dev: &D) -> anyhow::Result<f64> {
        let mut se = 0.0f64;
        let mut n = 0usize;
        for k in 0..2 {
            let (images, _) = self.world_batch(mix(seed, u64::MAX / 2 - k as u64, 0), 16, dev);
            let post = vae.encode(images.clone())?;
            let recon = vae.decode(post.mean)?.clamp(-1.0, 1.0);
            for (a, b) in recon.as_vec().iter().zip(images.as_vec()) {
                se += ((a - b) as f64 / 2.0).powi(2);
                n += 1;
            }
        }
        let mse = se / n.max(1) as f64;
        Ok(10.0 * (1.0 / mse.max(1e-12)).log10())
    }
}

/// Log-variance the posterior starts at: a standard deviation of 0.05. From the usual zero the
/// latents would start drowned in unit noise, and Adam moves the log-variance by about the
/// learning rate per step, so the VAE would spend its first thousands of steps only shrinking it.
const INITIAL_LOGVAR: f32 = -6.0;

/// Sets the bias of the log-variance half of the encoder's last conv (`quant_conv`, or
/// `conv_out` without it) to [`INITIAL_LOGVAR`].
fn small_initial_variance<D: Device<f32>>(vae: &mut Vae<D>, dev: &D) {
    let z = vae.config.latent_channels;
    let conv = match &mut vae.quant_conv {
        Some(q) => q,
        None => &mut vae.encoder.conv_out,
    };
    if let Some(bias) = &mut conv.bias {
        let mut b = bias.as_vec();
        for v in b.iter_mut().skip(z) {
            *v = INITIAL_LOGVAR;
        }
        *bias = dev.tensor_from_vec(b, (2 * z,));
    }
}

/// The newest readable checkpoint, loaded into `models`.
fn load_pretrain_checkpoint<D: Device<f32>>(
    scratch: &Path,
    models: &mut Models<D>,
    dev: &D,
    ctx: &StageContext<'_>,
) -> anyhow::Result<Option<(AdamW<D>, PretrainState)>> {
    let found = resume::newest(
        scratch,
        |m| ctx.progress.message(m),
        |dir| -> anyhow::Result<_> {
            let state: PretrainState = read_state(dir)?;
            let mut unet = models.unet.clone();
            let mut vae = models.vae.clone();
            let mut te = models.text_encoder.clone();
            load_weights(
                &mut unet,
                &read_safetensors(&dir.join("unet.safetensors"))?.tensors,
            )?;
            load_weights(
                &mut vae,
                &read_safetensors(&dir.join("vae.safetensors"))?.tensors,
            )?;
            load_weights(
                &mut te,
                &read_safetensors(&dir.join("text_encoder.safetensors"))?.tensors,
            )?;
            let optimizer = AdamW::load(dev, &dir.join("optimizer.safetensors"))?;
            Ok((unet, vae, te, optimizer, state))
        },
    )?;
    let Some((unet, mut vae, text_encoder, optimizer, state)) = found else {
        return Ok(None);
    };
    if let Some(s) = state.scaling_factor {
        vae.config.scaling_factor = s;
    }
    *models = Models {
        unet,
        vae,
        text_encoder,
    };
    Ok(Some((optimizer, state)))
}
