//! The `lora` method: kohya/PEFT-initialised adapters on the modules `targets` names (the
//! UNet's attention projections by default; feed-forwards, projections and convolutions, LoCon,
//! too), optionally on the text encoder, trained with [`LoraSteps`]; checkpoints and the
//! kohya-format `lora.safetensors`.

use crate::stages::artifact::Artifact;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context as _, bail};
use dfdx::prelude::*;

use crate::diffusion::nn::Elem;
use crate::formats::HostTensor;
use crate::formats::lora::{
    DoraModule, HadaModule, KohyaMetadata, KronModule, LoraComponent, LoraModule, LoraNetwork,
    NetworkModule, read_lora, write_kohya,
};
use crate::stages::context::{StageContext, StageResult};
use crate::train::Method;
use crate::train::eval::eval_loss;
use crate::train::lora::{LoraTarget, delta_weights, install};
use crate::train::methods::LoraSteps;
use crate::train::mixed::Masters;
use crate::train::mixed::StepScaler;
use crate::train::optim::{Optimizer, OptimizerKind};
use crate::train::resume::{self, TrainState, read_state};
use crate::train::text::TextInputs;

use super::{RunEnd, Setup, TrainParams, Trained, schedule};

impl TrainParams {
    pub(super) fn run_lora<E: Elem, D: Device<f32> + Device<E>>(
        &self,
        ctx: &StageContext<'_>,
        dev: D,
    ) -> anyhow::Result<StageResult> {
        let settings = &ctx.settings;
        let Setup {
            manifest,
            items,
            validation,
            ckpt: _,
            model_path,
            t2i,
            dev,
        } = self.setup::<E, D>(ctx, dev)?;
        let mut contexts = self.frozen_contexts(ctx, &t2i, &items)?;
        let (ddpm, sampling) = self.noise_process(&t2i.scheduler_config)?;
        let scaling = manifest.scaling_factor as f32;
        let mut unet = t2i.models.unet;
        let mut text_encoder = super::single_text_encoder(t2i.models.text_encoders, "lora")?;
        let mut ids: HashMap<String, Vec<u32>> = HashMap::new();
        for item in &items {
            ids.insert(
                item.caption.clone(),
                t2i.tokenizer.encode(&item.caption)?.input_ids,
            );
        }

        // Adapters: fresh, or from the newest valid checkpoint.
        let scratch = ctx.scratch()?;
        let seed = settings.seed;
        let mut fresh = LoraNetwork {
            unet: self.init_modules(&mut unet, &self.lora.targets, seed)?,
            ..LoraNetwork::default()
        };
        if self.lora.text_encoder {
            fresh.text_encoder =
                self.init_modules(&mut text_encoder, &self.lora.text_encoder_targets, seed)?;
        }
        let trainable_params: usize = fresh.iter().map(|(_, _, m)| m.num_params()).sum();
        let known = fresh.clone();
        let (network, mut optimizer, mut state) =
            match load_checkpoint(&scratch, &known, self.optimizer, &dev, ctx)? {
                Some((n, o, s)) => (n, o, s),
                None => {
                    let (optimizer, state) = self.fresh_start(&dev);
                    (fresh, optimizer, state)
                }
            };
        install(&mut unet, &network, 1.0, &dev)?;
        install(&mut text_encoder, &network, 1.0, &dev)?;
        // The optimiser updates f32 masters; the adapters are refreshed from them (rounded to
        // f16 in mixed precision).
        let masters = Masters::of_lora(&network, &dev)?;
        let te_keys: std::collections::HashSet<String> = (network.text_encoder.iter())
            .flat_map(|(n, m)| m.params().into_iter().map(move |(k, _)| format!("{n}.{k}")))
            .collect();
        // LoHa, LoKr and DoRA act through ΔW, rebuilt from their factors and these weights
        let mut base_weights = delta_weights(&mut unet, &network.unet);
        base_weights.extend(delta_weights(&mut text_encoder, &network.text_encoder));
        let resumed_from = state.step;
        if state.step == 0 {
            state.eval_loss_before = eval_loss(&unet, &ddpm, &items, &contexts, scaling, seed)?;
        } else {
            ctx.progress.message(&format!(
                "{}: resuming from the checkpoint at step {}",
                ctx.instance.name, state.step
            ));
        }

        let sched = schedule(self).map_err(anyhow::Error::msg)?;
        let meta = KohyaMetadata {
            base_model_name: model_path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned()),
            base_model_hash: crate::sample::short_model_hash(&model_path).ok(),
            output_name: Some(ctx.instance.name.clone()),
            steps: Some(self.steps),
            max_train_steps: Some(self.steps),
            resolution: manifest.items.first().map(|i| (i.size[0], i.size[1])),
            learning_rate: Some(self.lr),
            unet_lr: Some(self.lr),
            text_encoder_lr: self
                .lora
                .text_encoder
                .then(|| self.lora.text_encoder_lr.unwrap_or(self.lr)),
            lr_scheduler: Some(self.lr_scheduler.clone()),
            optimizer: Some(self.optimizer.kohya_name(self.weight_decay)),
            seed: Some(seed),
            num_train_images: Some(manifest.items.len() as u64),
            extra: self.objective_metadata(),
            ..KohyaMetadata::default()
        };
        // The encoder trains (its states come from each step's own pass) or encodes the
        // captions caption shaping makes, frozen.
        let (trained_te, frozen_te) = if self.lora.text_encoder {
            (Some(&mut text_encoder), None)
        } else {
            (None, Some(&text_encoder))
        };
        let mut steps = LoraSteps {
            unet: &mut unet,
            text_encoder: trained_te,
            ddpm: &ddpm,
            text: TextInputs {
                contexts: &contexts,
                ids: &ids,
                clip_skip: self.clip_skip,
                tokenizer: Some(&t2i.tokenizer),
                frozen_encoder: frozen_te,
            },
            optimizer: &mut optimizer,
            scratch: &scratch,
            dropout: self.lora.dropout,
            seed,
            te_lr_factor: self.lora.text_encoder_lr.map_or(1.0, |l| l / self.lr),
            masters,
            te_keys,
            scaler: StepScaler::new::<E>(state.loss_scaler),
            metadata: meta.clone(),
            modules: network,
            base_weights,
            dev: dev.clone(),
        };
        let wall_s = self.drive(
            ctx,
            "lora",
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
        let network = steps.network();
        let LoraSteps { scaler, .. } = steps;
        let scaler = scaler.scaler;
        if scaler.skipped > 0 {
            ctx.progress.message(&format!(
                "{}: {} of {} steps skipped on an f16 gradient overflow (loss scale now {})",
                ctx.instance.name, scaler.skipped, self.steps, scaler.scale
            ));
        }

        // The trained text encoder changes the contexts the evaluation uses.
        if self.lora.text_encoder {
            for (caption, c) in contexts.iter_mut() {
                *c = text_encoder.encode(&[ids[caption].clone()], self.clip_skip)?;
            }
        }
        let eval_after = eval_loss(&unet, &ddpm, &items, &contexts, scaling, seed)?;
        let out = scratch.join("final.safetensors");
        write_kohya(&out, &network, &meta)?;
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
                kind: Artifact::Lora,
                blob,
                sampling: sampling.as_ref(),
            },
            &items,
        )?;
        result.summary = format!(
            "{} r{} α{}: {} steps, eval loss {:.4} → {:.4}, {:.1} steps/s, {} KiB",
            self.method_name(),
            self.lora.rank,
            self.alpha(),
            self.steps,
            metrics.eval_loss_before,
            metrics.eval_loss_after,
            metrics.steps_per_s,
            metrics.artifact_bytes / 1024
        );
        let _ = std::fs::remove_dir_all(scratch.join("checkpoints"));
        Ok(result)
    }

    /// The method as its summary line names it.
    fn method_name(&self) -> &'static str {
        match self.method {
            Method::Locon => "locon",
            Method::Loha => "loha",
            Method::Lokr => "lokr",
            Method::Dora => "dora",
            _ => "lora",
        }
    }

    /// Freshly initialised modules of the method (LoRA/LoCon as kohya and PEFT initialise
    /// them, LoHa, LoKr and DoRA as LyCORIS does) for every module of `model` whose path ends
    /// with one of `targets`; an unmatched target is an error listing the module names that
    /// exist.
    pub(super) fn init_modules<E: Elem, D: Device<E>, M: LoraTarget<D, E>>(
        &self,
        model: &mut M,
        targets: &[String],
        seed: u64,
    ) -> anyhow::Result<BTreeMap<String, NetworkModule>> {
        let modules = crate::train::lora::lora_modules(model);
        let mut weights: BTreeMap<String, HostTensor> = BTreeMap::new();
        if self.method == Method::Dora {
            model.for_each_lora_layer_mut(&mut |name, layer| {
                if targets.iter().any(|t| name.ends_with(&format!(".{t}"))) {
                    weights.insert(name.to_string(), layer.weight_host());
                }
            });
        }
        let mut out = BTreeMap::new();
        for target in targets {
            let matching: Vec<&(String, Vec<usize>)> = modules
                .iter()
                .filter(|(n, _)| n.ends_with(&format!(".{target}")))
                .collect();
            if matching.is_empty() {
                let mut suffixes: Vec<&str> = modules.iter().map(|(n, _)| local_name(n)).collect();
                suffixes.sort();
                suffixes.dedup();
                bail!(
                    "LoRA target `{target}` matches no {} module; available: {}",
                    M::NAME,
                    suffixes.join(", ")
                );
            }
            for (name, shape) in matching {
                let module_seed = seed
                    ^ u64::from_le_bytes(blake3::hash(name.as_bytes()).as_bytes()[..8].try_into()?);
                let (rank, alpha) = (self.lora.rank, self.alpha());
                let module = match self.method {
                    Method::Loha => {
                        HadaModule::init(shape, rank, alpha, module_seed).map(NetworkModule::Hada)
                    }
                    Method::Lokr => {
                        KronModule::init(shape, rank, alpha, self.lora.factor, module_seed)
                            .map(NetworkModule::Kron)
                    }
                    Method::Dora => match weights.get(name) {
                        Some(w) => {
                            DoraModule::init(w, rank, alpha, module_seed).map(NetworkModule::Dora)
                        }
                        None => Err(format!("no weight for `{name}`")),
                    },
                    _ => LoraModule::init(shape, rank, alpha, module_seed).map(NetworkModule::Lora),
                }
                .map_err(anyhow::Error::msg)?;
                out.insert(name.clone(), module);
            }
        }
        Ok(out)
    }
}

/// The newest readable LoRA checkpoint with this run's modules.
fn load_checkpoint<D: Device<f32>>(
    scratch: &Path,
    known: &LoraNetwork,
    kind: OptimizerKind,
    dev: &D,
    ctx: &StageContext<'_>,
) -> anyhow::Result<Option<(LoraNetwork, Optimizer<D>, TrainState)>> {
    resume::newest(
        scratch,
        |m| ctx.progress.message(m),
        |dir| {
            let state = read_state(dir)?;
            let (mut network, _) = read_lora(&dir.join(Artifact::Lora.file_name()), None)?;
            for component in [LoraComponent::Unet, LoraComponent::TextEncoder] {
                let expected = known.modules(component);
                let found = network.modules_mut(component);
                for (name, m) in found.iter_mut() {
                    let fresh = expected
                        .get(name)
                        .context("checkpoint has a module this run does not train")?;
                    m.conform_to(fresh).map_err(anyhow::Error::msg)?;
                }
                if found.len() != expected.len() {
                    bail!(
                        "checkpoint has {} {component:?} modules, expected {}",
                        found.len(),
                        expected.len()
                    );
                }
            }
            let optimizer = Optimizer::load(dev, &dir.join("optimizer.safetensors"), kind)?;
            Ok((network, optimizer, state))
        },
    )
}

/// A module's name inside its block (`attn1.to_out.0`, `conv1`, `ff.net.2`,
/// `self_attn.q_proj`): what follows the last `resnets.N.`, `attentions.N.`,
/// `transformer_blocks.N.`, `downsamplers.N.`, `upsamplers.N.` or `layers.N.` of its path (the
/// whole path outside blocks, `time_embedding.linear_1`). Any such tail is a LoRA target.
fn local_name(path: &str) -> &str {
    const BLOCKS: [&str; 6] = [
        "resnets",
        "attentions",
        "transformer_blocks",
        "downsamplers",
        "upsamplers",
        "layers",
    ];
    let segments: Vec<&str> = path.split('.').collect();
    let mut start = 0;
    for (i, pair) in segments.windows(2).enumerate() {
        if BLOCKS.contains(&pair[0]) && pair[1].bytes().all(|b| b.is_ascii_digit()) {
            start = i + 2;
        }
    }
    let skipped: usize = segments[..start.min(segments.len())]
        .iter()
        .map(|s| s.len() + 1)
        .sum();
    &path[skipped.min(path.len())..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_names_are_the_tails_after_the_last_block() {
        for (path, local) in [
            (
                "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0",
                "attn1.to_out.0",
            ),
            ("up_blocks.2.resnets.0.conv_shortcut", "conv_shortcut"),
            ("down_blocks.1.downsamplers.0.conv", "conv"),
            ("time_embedding.linear_1", "time_embedding.linear_1"),
            ("text_model.encoder.layers.11.mlp.fc2", "mlp.fc2"),
        ] {
            assert_eq!(local_name(path), local);
        }
    }
}
