//! The `textual_inversion` method: new token vectors trained through the frozen text encoder
//! and UNet with [`TiSteps`]; checkpoints and the A1111/kohya and diffusers embedding files.

use crate::stages::artifact::Artifact;
use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context as _, bail};
use dfdx::prelude::*;

use crate::diffusion::nn::{Elem, Tensor2, Tensor3};
use crate::diffusion::text_to_image::TextToImage;
use crate::formats::HostTensor;
use crate::formats::embedding::{
    Embedding, read_embedding, write_a1111_safetensors, write_diffusers,
};
use crate::stages::context::{StageContext, StageResult};
use crate::train::eval::eval_loss;
use crate::train::methods::TiSteps;
use crate::train::mixed::StepScaler;
use crate::train::optim::{Optimizer, OptimizerKind};
use crate::train::resume::{self, TrainState, read_state};
use crate::train::text::TextInputs;

use super::{RunEnd, Setup, TrainParams, Trained, schedule};

impl TrainParams {
    pub(super) fn run_textual_inversion<E: Elem, D: Device<f32> + Device<E>>(
        &self,
        ctx: &StageContext<'_>,
        dev: D,
    ) -> anyhow::Result<StageResult> {
        let settings = &ctx.settings;
        let ti = &self.textual_inversion;
        let token = ti
            .token
            .clone()
            .context("textual inversion needs a token")?;
        let Setup {
            manifest,
            items,
            validation,
            ckpt: _,
            model_path,
            mut t2i,
            dev,
        } = self.setup::<E, D>(ctx, dev)?;
        let (ddpm, sampling) = self.noise_process(&t2i.scheduler_config)?;
        let scaling = manifest.scaling_factor as f32;
        let d = t2i.models.text_encoder().config.hidden_size;

        // The initial vectors: the init word's token embeddings, repeated to num_vectors.
        let init_ids = t2i.tokenizer.encode_untruncated(&ti.init_word)?;
        let content: Vec<u32> = init_ids
            .iter()
            .copied()
            .filter(|&i| i != t2i.tokenizer.bos_id() && i != t2i.tokenizer.eos_id())
            .collect();
        if content.is_empty() {
            bail!("init_word {:?} has no tokens", ti.init_word);
        }
        let table = t2i.models.text_encoder().token_embedding.as_vec();
        let mut vectors = Vec::with_capacity(ti.num_vectors * d);
        for i in 0..ti.num_vectors {
            let row = content[i % content.len()] as usize;
            vectors.extend_from_slice(&table[row * d..(row + 1) * d]);
        }
        t2i.tokenizer.allow_existing_tokens(ti.allow_existing_token);
        let new_ids = t2i
            .add_embedding(&token, &vectors)
            .with_context(|| format!("adding the token `{token}`"))?;
        let mut ids: HashMap<String, Vec<u32>> = HashMap::new();
        for item in &items {
            let encoded = t2i.tokenizer.encode(&item.caption)?.input_ids;
            ids.insert(item.caption.clone(), encoded);
        }
        if !ids.values().any(|v| v.iter().any(|i| new_ids.contains(i))) {
            bail!(
                "no caption contains the token `{token}`: write it in the captions (e.g. template = \"a photo of {{token}}\" with token = \"{token}\")"
            );
        }

        let scratch = ctx.scratch()?;
        let seed = settings.seed;
        let (mut extra, mut optimizer, mut state) = match load_ti_checkpoint(
            &scratch,
            &token,
            ti.num_vectors * d,
            self.optimizer,
            &dev,
            ctx,
        )? {
            Some(found) => found,
            None => {
                let extra = dev.tensor_from_vec(vectors.clone(), (ti.num_vectors, d));
                let (optimizer, state) = self.fresh_start(&dev);
                (extra, optimizer, state)
            }
        };
        let resumed_from = state.step;
        let contexts_now = |t2i: &mut TextToImage<D, E>,
                            extra: &Tensor2<D>|
         -> anyhow::Result<HashMap<String, Tensor3<D>>> {
            t2i.extra_embeddings = extra.as_vec();
            let mut out = HashMap::new();
            for caption in ids.keys() {
                out.insert(caption.clone(), t2i.encode_prompt(caption, self.clip_skip)?);
            }
            Ok(out)
        };
        if state.step == 0 {
            let contexts = contexts_now(&mut t2i, &extra)?;
            state.eval_loss_before =
                eval_loss(&t2i.models.unet, &ddpm, &items, &contexts, scaling, seed)?;
        } else {
            ctx.progress.message(&format!(
                "{}: resuming from the checkpoint at step {}",
                ctx.instance.name, state.step
            ));
        }

        let sched = schedule(self).map_err(anyhow::Error::msg)?;
        let embedding =
            |extra: &Tensor2<D>, step: u64| self.embedding(&token, extra, step, &model_path);
        let mut steps = TiSteps {
            clip_skip: self.clip_skip,
            text_encoder: t2i.models.text_encoder(),
            unet: &t2i.models.unet,
            ddpm: &ddpm,
            text: TextInputs {
                contexts: &HashMap::new(),
                ids: &ids,
                clip_skip: self.clip_skip,
                tokenizer: Some(&t2i.tokenizer),
                frozen_encoder: None,
            },
            extra: &mut extra,
            optimizer: &mut optimizer,
            scratch: &scratch,
            embedding: &embedding,
            scaler: StepScaler::new::<E>(state.loss_scaler),
        };
        let wall_s = self.drive(
            ctx,
            "embedding",
            &mut state,
            (&items, &validation),
            scaling,
            seed,
            &dev,
            &sched,
            &mut steps,
        )?;
        // schedule-free AdamW evaluates and saves x, not the training point
        optimizer.to_eval(
            crate::train::methods::textual_inversion::EMB_PARAMS,
            &mut extra,
        );
        let contexts = contexts_now(&mut t2i, &extra)?;
        let eval_after = eval_loss(&t2i.models.unet, &ddpm, &items, &contexts, scaling, seed)?;

        let embedding = self.embedding(&token, &extra, self.steps, &model_path);
        let a1111 = scratch.join(Artifact::Embedding.file_name());
        write_a1111_safetensors(&a1111, &embedding)?;
        let diffusers = scratch.join(Artifact::DiffusersEmbedding.file_name());
        write_diffusers(&diffusers, &embedding)?;
        let blob = ctx.store.put_file(&a1111)?;
        let (mut result, metrics) = self.finish(
            ctx,
            &sched,
            &state,
            RunEnd {
                eval_after,
                wall_s,
                resumed_from,
                trainable_params: ti.num_vectors * d,
            },
            Trained {
                kind: Artifact::Embedding,
                blob,
                sampling: sampling.as_ref(),
            },
            &items,
        )?;
        result.outputs.insert(
            Artifact::DiffusersEmbedding.file_name().into(),
            ctx.store.put_file(&diffusers)?,
        );
        result.summary = format!(
            "textual inversion `{token}` ×{}: {} steps, eval loss {:.4} → {:.4}, {:.1} steps/s",
            ti.num_vectors,
            self.steps,
            metrics.eval_loss_before,
            metrics.eval_loss_after,
            metrics.steps_per_s
        );
        let _ = std::fs::remove_dir_all(scratch.join("checkpoints"));
        Ok(result)
    }

    pub(super) fn embedding<D: Device<f32>>(
        &self,
        token: &str,
        extra: &Tensor2<D>,
        step: u64,
        model_path: &Path,
    ) -> Embedding {
        Embedding {
            token: token.to_string(),
            vectors: HostTensor::from_tensor(extra),
            step: Some(step),
            sd_checkpoint: crate::sample::short_model_hash(model_path).ok(),
            sd_checkpoint_name: model_path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned()),
        }
    }
}

/// What a textual-inversion checkpoint restores: vectors, optimiser, state.
type TiResume<D> = (Tensor2<D>, Optimizer<D>, TrainState);

/// The newest readable textual-inversion checkpoint (vectors, optimiser, state).
fn load_ti_checkpoint<D: Device<f32>>(
    scratch: &Path,
    token: &str,
    numel: usize,
    kind: OptimizerKind,
    dev: &D,
    ctx: &StageContext<'_>,
) -> anyhow::Result<Option<TiResume<D>>> {
    resume::newest(
        scratch,
        |m| ctx.progress.message(m),
        |dir| {
            let state = read_state(dir)?;
            let (emb, _) = read_embedding(&dir.join(Artifact::Embedding.file_name()), Some(token))?;
            if emb.vectors.numel() != numel || emb.vectors.shape.len() != 2 {
                bail!("checkpoint vectors have shape {:?}", emb.vectors.shape);
            }
            let extra = dev.tensor_from_vec(
                emb.vectors.data.clone(),
                (emb.vectors.shape[0], emb.vectors.shape[1]),
            );
            let optimizer = Optimizer::load(dev, &dir.join("optimizer.safetensors"), kind)?;
            Ok((extra, optimizer, state))
        },
    )
}
