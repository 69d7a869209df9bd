//! `method = "dreambooth"`: every UNet parameter trains (the text encoder and the VAE stay
//! frozen), with prior preservation when the stage also needs a `class_images` stage:
//! `loss = mse(instance) + prior_loss_weight · mse(class)`, one class micro-batch drawn beside
//! every instance micro-batch (diffusers' `train_dreambooth.py`). The result is a single-file
//! checkpoint in the original layout (`model.safetensors`, f16 or f32) that A1111, ComfyUI and
//! diffusers' `from_single_file` load.

use crate::stages::artifact::Artifact;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::formats::HostTensor;

use anyhow::Context as _;
use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use super::{RunEnd, Setup, TrainParams, Trained, load_items, schedule};
use crate::diffusion::checkpoint::single_file::StoredConfigs;
use crate::diffusion::nn::Elem;
use crate::diffusion::params::{copy_params, count_params, set_trainable};
use crate::diffusion::{TextEncoder, UNet};
use crate::formats::checkpoint::{ModelTensors, SaveDtype, write_single_file};
use crate::formats::read_safetensors;
use crate::stages::context::{StageContext, StageResult};
use crate::stages::encode_latents::LatentsManifest;
use crate::train::eval::eval_loss;
use crate::train::methods::DreamboothSteps;
use crate::train::methods::dreambooth::as_f32;
use crate::train::mixed::StepScaler;
use crate::train::optim::{Optimizer, OptimizerKind};
use crate::train::resume::{self, TrainState, read_state};
use crate::train::text::TextInputs;

/// DreamBooth settings (`[stage.NAME.dreambooth]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DreamboothParams {
    /// Weight of the class (prior-preservation) loss; used when the stage needs a
    /// `class_images` stage (diffusers' `prior_loss_weight`, default 1.0).
    #[serde(default = "default_prior_loss_weight")]
    pub prior_loss_weight: f64,
    /// Dtype of the saved checkpoint: `"f16"` (half the size, what shared checkpoints use) or
    /// `"f32"`.
    #[serde(default)]
    pub save_dtype: SaveDtype,
    /// Train the text encoder too (every parameter, embeddings included; diffusers'
    /// `--train_text_encoder`).
    #[serde(default)]
    pub train_text_encoder: bool,
    /// Learning rate of the text encoder; default `lr`.
    #[serde(default)]
    pub text_encoder_lr: Option<f64>,
    /// This method's learning rate in a `matrix.method` stage; default the stage's `lr`.
    #[serde(default)]
    pub lr: Option<f64>,
}

impl Default for DreamboothParams {
    fn default() -> Self {
        DreamboothParams {
            prior_loss_weight: default_prior_loss_weight(),
            save_dtype: SaveDtype::default(),
            train_text_encoder: false,
            text_encoder_lr: None,
            lr: None,
        }
    }
}

fn default_prior_loss_weight() -> f64 {
    1.0
}

impl TrainParams {
    /// Runs DreamBooth with the UNet computing in `E`. In mixed precision (`E` = f16) an f32
    /// copy of the UNet holds the master weights the optimiser updates; the f16 working copy
    /// is refreshed from it after every step.
    pub(super) fn run_dreambooth<E: Elem, D: Device<f32> + Device<E>>(
        &self,
        ctx: &StageContext<'_>,
        dev: D,
    ) -> anyhow::Result<StageResult> {
        let settings = &ctx.settings;
        let Setup {
            manifest,
            items,
            validation,
            ckpt,
            model_path,
            t2i,
            dev,
        } = self.setup::<E, D>(ctx, dev)?;
        let prior_weight = self.dreambooth.prior_loss_weight as f32;
        let class_items = match ctx.upstream_of_kind("class_images") {
            Ok((_, record)) if prior_weight > 0.0 => {
                let m: LatentsManifest = ctx.read_json(record, Artifact::Manifest.file_name())?;
                load_items(ctx, &m)?
            }
            _ => Vec::new(),
        };
        if class_items.is_empty() && prior_weight > 0.0 {
            ctx.progress.message(&format!(
                "{}: no class_images stage in `needs`: training without prior preservation",
                ctx.instance.name
            ));
        }

        let mut contexts = self.frozen_contexts(ctx, &t2i, items.iter().chain(&class_items))?;
        let mut ids: HashMap<String, Vec<u32>> = HashMap::new();
        for item in items.iter().chain(&class_items) {
            if !ids.contains_key(&item.caption) {
                ids.insert(
                    item.caption.clone(),
                    t2i.tokenizer.encode(&item.caption)?.input_ids,
                );
            }
        }
        let (ddpm, sampling) = self.noise_process(&t2i.scheduler_config)?;
        let scaling = manifest.scaling_factor as f32;
        let mut unet = t2i.models.unet;
        let mut text_encoder = super::single_text_encoder(t2i.models.text_encoders, "dreambooth")?;
        let train_te = self.dreambooth.train_text_encoder;
        let mut trainable_params = count_params(&mut unet);
        if train_te {
            trainable_params += count_params(&mut text_encoder);
        }

        let scratch = ctx.scratch()?;
        let seed = settings.seed;
        // f32 masters (mixed precision only; an f32 run updates its UNet in place)
        let mut master: Option<UNet<D>> = if E::HALF {
            Some(ckpt.load_unet(&dev)?)
        } else {
            None
        };
        let te_for_resume = train_te.then_some(&mut text_encoder);
        let resumed = match master.as_mut() {
            Some(m) => load_full_checkpoint(&scratch, m, te_for_resume, self.optimizer, &dev, ctx)?,
            None => load_full_checkpoint(
                &scratch,
                as_f32(&mut unet)?,
                te_for_resume,
                self.optimizer,
                &dev,
                ctx,
            )?,
        };
        if let (Some(m), Some(_)) = (master.as_mut(), &resumed) {
            copy_params(m, &mut unet).map_err(anyhow::Error::msg)?;
        }
        let (optimizer, mut state) = match resumed {
            Some(found) => found,
            None => self.fresh_start(&dev),
        };
        if state.step > 0 && train_te {
            // the contexts of a resumed run come from its text encoder
            for (caption, c) in contexts.iter_mut() {
                *c = text_encoder.encode(&[ids[caption].clone()], self.clip_skip)?;
            }
        }
        let resumed_from = state.step;
        if state.step == 0 {
            state.eval_loss_before = eval_loss(&unet, &ddpm, &items, &contexts, scaling, seed)?;
        } else {
            ctx.progress.message(&format!(
                "{}: resuming from the checkpoint at step {}",
                ctx.instance.name, state.step
            ));
        }

        set_trainable(&mut unet, true);
        if train_te {
            set_trainable(&mut text_encoder, true);
        }
        let sched = schedule(self).map_err(anyhow::Error::msg)?;
        let mut optimizer = optimizer;
        // The checkpoint a run publishes (and saves every `save_every` steps): the trained
        // UNet (and text encoder) beside the base model's VAE.
        let unet_config = unet.config.clone();
        let write_model = |out: &Path,
                           unet_tensors: BTreeMap<String, HostTensor>,
                           te_tensors: Option<BTreeMap<String, HostTensor>>,
                           step: u64|
         -> anyhow::Result<()> {
            let mut tensors = ModelTensors::read(&ckpt)
                .with_context(|| format!("reading {}", model_path.display()))?;
            tensors.unet = unet_tensors;
            if let Some(te) = te_tensors {
                tensors.text_encoder = te;
            }
            let recipe = serde_json::json!({
                "method": "dreambooth",
                "base_model": model_path.file_name().map(|n| n.to_string_lossy().into_owned()),
                "base_model_hash": crate::sample::short_model_hash(&model_path).ok(),
                "steps": step,
                "lr": self.lr,
                "lr_scheduler": self.lr_scheduler,
                "batch_size": self.batch_size,
                "gradient_accumulation": self.gradient_accumulation,
                "prior_loss_weight": prior_weight,
                "train_text_encoder": train_te,
                "instance_images": manifest.items.len(),
                "class_images": class_items.len(),
                "seed": seed,
            });
            let metadata = BTreeMap::from([
                ("sdpipe_train_recipe".to_string(), recipe.to_string()),
                ("format".to_string(), "pt".to_string()),
            ]);
            write_single_file(
                out,
                &tensors,
                &StoredConfigs {
                    unet: unet_config.clone(),
                    ..ckpt.configs()
                },
                self.dreambooth.save_dtype,
                &metadata,
            )?;
            Ok(())
        };
        let (trained_te, frozen_te) = if train_te {
            (Some(&mut text_encoder), None)
        } else {
            (None, Some(&text_encoder))
        };
        let mut steps = DreamboothSteps {
            sampling: self.sampling(),
            unet: &mut unet,
            text_encoder: trained_te,
            ddpm: &ddpm,
            items: &items,
            class_items: &class_items,
            text: TextInputs {
                contexts: &contexts,
                ids: &ids,
                clip_skip: self.clip_skip,
                tokenizer: Some(&t2i.tokenizer),
                frozen_encoder: frozen_te,
            },
            optimizer: &mut optimizer,
            scratch: &scratch,
            scaling,
            prior_weight,
            seed,
            te_lr_factor: self.dreambooth.text_encoder_lr.map_or(1.0, |l| l / self.lr),
            master: master.as_mut(),
            scaler: StepScaler::new::<E>(state.loss_scaler),
            write_model: &write_model,
        };
        let wall_s = self.drive(
            ctx,
            "dreambooth",
            &mut state,
            (&items, &validation),
            scaling,
            seed,
            &dev,
            &sched,
            &mut steps,
        )?;
        // schedule-free AdamW evaluates and saves x, not the training point
        steps.to_eval()?;
        let skipped = steps.scaler.scaler.skipped;
        if skipped > 0 {
            ctx.progress.message(&format!(
                "{}: {skipped} of {} steps skipped on an f16 gradient overflow",
                ctx.instance.name, self.steps
            ));
        }
        set_trainable(&mut unet, false);
        set_trainable(&mut text_encoder, false);
        if train_te {
            for (caption, c) in contexts.iter_mut() {
                *c = text_encoder.encode(&[ids[caption].clone()], self.clip_skip)?;
            }
        }
        let eval_after = eval_loss(&unet, &ddpm, &items, &contexts, scaling, seed)?;

        let unet_tensors = match master.as_mut() {
            Some(m) => crate::diffusion::params::named_tensors(m),
            None => crate::diffusion::params::named_tensors(&mut unet),
        };
        let te_tensors =
            train_te.then(|| crate::diffusion::params::named_tensors(&mut text_encoder));
        let out = scratch.join(Artifact::Checkpoint.file_name());
        write_model(&out, unet_tensors, te_tensors, self.steps)?;
        let blob = ctx.store.put_file(&out)?;

        let (mut result, metrics) = self.finish(
            ctx,
            &sched,
            &state,
            RunEnd {
                eval_after,
                wall_s,
                resumed_from,
                trainable_params,
            },
            Trained {
                kind: Artifact::Checkpoint,
                blob,
                sampling: sampling.as_ref(),
            },
            &items,
        )?;
        result.summary = format!(
            "dreambooth{}{}: {} steps, eval loss {:.4} → {:.4}, {:.2} steps/s, {} MiB checkpoint",
            if train_te { " + text encoder" } else { "" },
            if class_items.is_empty() {
                String::new()
            } else {
                format!(" (+{} class images)", class_items.len())
            },
            self.steps,
            metrics.eval_loss_before,
            metrics.eval_loss_after,
            metrics.steps_per_s,
            metrics.artifact_bytes / (1024 * 1024)
        );
        let _ = std::fs::remove_dir_all(scratch.join("checkpoints"));
        let _ = std::fs::remove_file(&out);
        Ok(result)
    }
}

pub(super) use crate::train::resume::load_weights;

/// The newest readable full checkpoint, loaded into `unet` (and `text_encoder` when it
/// trains); an unreadable one is reported and skipped (the models are only touched by a
/// checkpoint that reads completely).
fn load_full_checkpoint<D: Device<f32>>(
    scratch: &Path,
    unet: &mut UNet<D>,
    text_encoder: Option<&mut TextEncoder<D>>,
    kind: OptimizerKind,
    dev: &D,
    ctx: &StageContext<'_>,
) -> anyhow::Result<Option<(Optimizer<D>, TrainState)>> {
    type Loaded<E> = (UNet<E>, Option<TextEncoder<E>>, Optimizer<E>, TrainState);
    let found = resume::newest(
        scratch,
        |m| ctx.progress.message(m),
        |dir| -> anyhow::Result<Loaded<D>> {
            let state = read_state(dir)?;
            let file = read_safetensors(&dir.join("unet.safetensors"))?;
            let mut candidate = unet.clone();
            load_weights(&mut candidate, &file.tensors)?;
            let te = match text_encoder.as_deref() {
                Some(te) => {
                    let file = read_safetensors(&dir.join("text_encoder.safetensors"))?;
                    let mut candidate = te.clone();
                    load_weights(&mut candidate, &file.tensors)?;
                    Some(candidate)
                }
                None => None,
            };
            let optimizer = Optimizer::load(dev, &dir.join("optimizer.safetensors"), kind)?;
            Ok((candidate, te, optimizer, state))
        },
    )?;
    let Some((loaded, te, optimizer, state)) = found else {
        return Ok(None);
    };
    *unet = loaded;
    if let (Some(slot), Some(te)) = (text_encoder, te) {
        *slot = te;
    }
    Ok(Some((optimizer, state)))
}
