//! `method = "hypernetwork"`: an A1111 hypernetwork (k and v MLPs per context width applied as
//! `x + mlp(x)` to the context of the UNet attentions' keys and values) trained on the
//! epsilon objective with the UNet and the text encoder frozen. Outputs `hypernetwork.pt` (the
//! torch file A1111 loads from `models/hypernetworks`) and its safetensors twin.
//!
//! ```toml
//! [stage.train.hypernetwork]
//! sizes = [768]              # context widths (default: the text encoder's width)
//! layer_structure = [1, 2, 1]
//! activation = "linear"      # relu, leakyrelu, elu, swish (Hardswish), tanh, sigmoid, …
//! layer_norm = false
//! use_dropout = false        # or dropout_structure = [0, 0.1, 0]
//! weight_init = "Normal"     # XavierUniform, XavierNormal, KaimingUniform, KaimingNormal
//! ```
//!
//! Dropout masks come from the per-step seed, so a rerun (and a resumed run) is bit-identical.

use crate::stages::artifact::Artifact;
use std::path::Path;

use anyhow::bail;
use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use super::{RunEnd, Setup, TrainParams, Trained, schedule};
use crate::diffusion::hypernetwork::HyperActivation;
use crate::diffusion::nn::Elem;
use crate::formats::hypernetwork::{
    Hypernetwork, HypernetworkConfig, read_hypernetwork, sequential_layout, write_hypernetwork_pt,
    write_hypernetwork_safetensors,
};
use crate::stages::ParamError;
use crate::stages::context::{StageContext, StageResult};
use crate::train::batch::mix;
use crate::train::eval::eval_loss;
use crate::train::hypernetwork::{HyperNet, install};
use crate::train::methods::HyperSteps;
use crate::train::mixed::StepScaler;
use crate::train::optim::{Optimizer, OptimizerKind};
use crate::train::resume::{self, TrainState, read_state};
use crate::train::text::TextInputs;

/// `[stage.NAME.hypernetwork]`: A1111's hypernetwork settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HypernetworkParams {
    /// Context widths to train modules for: the text encoder's width (768 for SD 1.x) feeds
    /// the cross-attentions; a level's width (320/640/1280 in SD 1.x) its self-attentions.
    /// Default: the text encoder's width.
    #[serde(default)]
    pub sizes: Option<Vec<usize>>,
    /// Width multipliers of the MLP, starting and ending with 1.
    #[serde(default = "default_layer_structure")]
    pub layer_structure: Vec<f64>,
    /// `linear`, `relu`, `leakyrelu`, `elu`, `swish` (A1111: Hardswish), `tanh`, `sigmoid`, …
    #[serde(default = "default_activation")]
    pub activation: String,
    /// Apply the activation after the last linear too.
    #[serde(default)]
    pub activate_output: bool,
    /// A LayerNorm after each linear (and its activation).
    #[serde(default)]
    pub layer_norm: bool,
    /// A1111's "use dropout": 0.3 after the hidden layers (see `last_layer_dropout`).
    #[serde(default)]
    pub use_dropout: bool,
    /// With `use_dropout`, dropout after the last hidden layer too.
    #[serde(default)]
    pub last_layer_dropout: bool,
    /// Explicit dropout probabilities, one per `layer_structure` entry (first and last 0);
    /// overrides `use_dropout`.
    #[serde(default)]
    pub dropout_structure: Option<Vec<f64>>,
    /// `Normal` (std 0.01), `XavierUniform`, `XavierNormal`, `KaimingUniform`, `KaimingNormal`.
    #[serde(default = "default_weight_init")]
    pub weight_init: String,
    /// The name stored in the file (default: the stage instance's name).
    #[serde(default)]
    pub name: Option<String>,
    /// This method's learning rate in a `matrix.method` stage; default the stage's `lr`.
    #[serde(default)]
    pub lr: Option<f64>,
}

impl Default for HypernetworkParams {
    fn default() -> Self {
        HypernetworkParams {
            sizes: None,
            layer_structure: default_layer_structure(),
            activation: default_activation(),
            activate_output: false,
            layer_norm: false,
            use_dropout: false,
            last_layer_dropout: false,
            dropout_structure: None,
            weight_init: default_weight_init(),
            name: None,
            lr: None,
        }
    }
}

fn default_layer_structure() -> Vec<f64> {
    vec![1.0, 2.0, 1.0]
}
fn default_activation() -> String {
    "linear".into()
}
fn default_weight_init() -> String {
    "Normal".into()
}

const WEIGHT_INITS: [&str; 5] = [
    "Normal",
    "XavierUniform",
    "XavierNormal",
    "KaimingUniform",
    "KaimingNormal",
];

impl HypernetworkParams {
    /// The file's settings.
    pub fn config(&self) -> HypernetworkConfig {
        let explicit = self
            .dropout_structure
            .as_ref()
            .is_some_and(|d| d.iter().any(|&p| p != 0.0));
        HypernetworkConfig {
            layer_structure: self.layer_structure.clone(),
            activation_func: Some(self.activation.to_ascii_lowercase()),
            is_layer_norm: self.layer_norm,
            weight_initialization: self.weight_init.clone(),
            activate_output: self.activate_output,
            use_dropout: self.use_dropout || explicit,
            dropout_structure: self.dropout_structure.clone(),
            last_layer_dropout: self.last_layer_dropout,
        }
    }

    pub(super) fn validate(&self) -> Result<(), ParamError> {
        let ls = &self.layer_structure;
        if ls.len() < 2
            || ls[0] != 1.0
            || ls[ls.len() - 1] != 1.0
            || ls.iter().any(|&m| !(m.is_finite() && m > 0.0))
        {
            return Err(ParamError::new(
                "hypernetwork.layer_structure",
                format!("layer_structure {ls:?} must start and end with 1, with positive entries"),
                "the default is [1, 2, 1]; A1111 also uses e.g. [1, 1.5, 1.5, 1]",
            ));
        }
        if let Err(e) = HyperActivation::parse(Some(&self.activation)) {
            return Err(ParamError::new(
                "hypernetwork.activation",
                e,
                "linear is A1111's default; swish is A1111's Hardswish",
            ));
        }
        if !WEIGHT_INITS.contains(&self.weight_init.as_str()) {
            return Err(ParamError::new(
                "hypernetwork.weight_init",
                format!("weight_init `{}` is unknown", self.weight_init),
                format!("use one of {}", WEIGHT_INITS.join(", ")),
            ));
        }
        if let Some(d) = &self.dropout_structure {
            let ok = d.len() == ls.len()
                && d.first() == Some(&0.0)
                && d.last() == Some(&0.0)
                && d.iter().all(|&p| (0.0..1.0).contains(&p));
            if !ok {
                return Err(ParamError::new(
                    "hypernetwork.dropout_structure",
                    format!(
                        "dropout_structure {d:?} must have one probability in [0, 1) per layer_structure entry ({}), starting and ending with 0",
                        ls.len()
                    ),
                    "e.g. [0, 0.1, 0] for [1, 2, 1]",
                ));
            }
        }
        if let Some(sizes) = &self.sizes {
            let mut sorted = sizes.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sizes.is_empty() || sizes.contains(&0) || sorted.len() != sizes.len() {
                return Err(ParamError::new(
                    "hypernetwork.sizes",
                    format!("sizes {sizes:?} must be distinct positive context widths"),
                    "e.g. [768] (SD 1.x cross-attention) or [768, 320, 640, 1280]",
                ));
            }
        }
        if let Err(e) = sequential_layout(8, &self.config()) {
            return Err(ParamError::new(
                "hypernetwork",
                e,
                "see A1111's hypernetwork settings",
            ));
        }
        Ok(())
    }
}

impl TrainParams {
    pub(super) fn run_hypernetwork<E: Elem, D: Device<f32> + Device<E>>(
        &self,
        ctx: &StageContext<'_>,
        dev: D,
    ) -> anyhow::Result<StageResult> {
        let settings = &ctx.settings;
        let hp = &self.hypernetwork;
        let Setup {
            manifest,
            items,
            validation,
            ckpt: _,
            model_path,
            t2i,
            dev,
        } = self.setup::<E, D>(ctx, dev)?;
        let contexts = self.frozen_contexts(ctx, &t2i, &items)?;
        let (ddpm, sampling) = self.noise_process(&t2i.scheduler_config)?;
        let scaling = manifest.scaling_factor as f32;
        let mut unet = t2i.models.unet;

        // The widths: the model must have each (a clear error before any work).
        let available = unet.attention_context_widths();
        let sizes = hp
            .sizes
            .clone()
            .unwrap_or_else(|| vec![unet.config.cross_attention_dim]);
        if let Some(w) = sizes.iter().find(|w| !available.contains(w)) {
            bail!(
                "hypernetwork.sizes: this model has no attention with context width {w}; its widths are {available:?} (the text encoder's width {} feeds the cross-attentions)",
                unet.config.cross_attention_dim
            );
        }

        let name = hp.name.clone().unwrap_or_else(|| ctx.instance.name.clone());
        let mut template =
            Hypernetwork::new(&name, hp.config(), &sizes, mix(settings.seed, 0x4e7, 0))
                .map_err(anyhow::Error::msg)?;
        template.sd_checkpoint = crate::sample::short_model_hash(&model_path).ok();
        template.sd_checkpoint_name = model_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned());

        let scratch = ctx.scratch()?;
        let seed = settings.seed;
        let (net, mut optimizer, mut state) =
            match load_checkpoint(&scratch, &template, self.optimizer, &dev, ctx)? {
                Some(found) => found,
                None => {
                    let (optimizer, state) = self.fresh_start(&dev);
                    (HyperNet::from_host(&template, &dev)?, optimizer, state)
                }
            };
        let trainable_params = net.num_params();
        let resumed_from = state.step;
        if state.step == 0 {
            install(&mut unet, &[(&net.to_elem::<E>(), 1.0)], None)?;
            state.eval_loss_before = eval_loss(&unet, &ddpm, &items, &contexts, scaling, seed)?;
        } else {
            ctx.progress.message(&format!(
                "{}: resuming from the checkpoint at step {}",
                ctx.instance.name, state.step
            ));
        }

        let sched = schedule(self).map_err(anyhow::Error::msg)?;
        let mut steps = HyperSteps {
            unet: &mut unet,
            ddpm: &ddpm,
            text: TextInputs {
                contexts: &contexts,
                ids: &std::collections::HashMap::new(),
                clip_skip: self.clip_skip,
                tokenizer: Some(&t2i.tokenizer),
                frozen_encoder: t2i.models.text_encoders.first(),
            },
            net,
            optimizer: &mut optimizer,
            scratch: &scratch,
            template: &template,
            seed,
            scaler: StepScaler::new::<E>(state.loss_scaler),
        };
        let wall_s = self.drive(
            ctx,
            "hypernetwork",
            &mut state,
            (&items, &validation),
            scaling,
            seed,
            &dev,
            &sched,
            &mut steps,
        )?;
        let mut net = steps.net;
        // schedule-free AdamW evaluates and saves x, not the training point
        crate::train::hypernetwork::to_eval(&mut net, &optimizer);

        install(&mut unet, &[(&net.to_elem::<E>(), 1.0)], None)?;
        let eval_after = eval_loss(&unet, &ddpm, &items, &contexts, scaling, seed)?;
        let mut trained = net.to_host(&template);
        trained.step = self.steps;
        let pt = scratch.join(Artifact::Hypernetwork.file_name());
        write_hypernetwork_pt(&pt, &trained)?;
        let st = scratch.join(Artifact::HypernetworkSafetensors.file_name());
        write_hypernetwork_safetensors(&st, &trained)?;
        let blob = ctx.store.put_file(&pt)?;

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
                kind: Artifact::Hypernetwork,
                blob,
                sampling: sampling.as_ref(),
            },
            &items,
        )?;
        result.outputs.insert(
            Artifact::HypernetworkSafetensors.file_name().into(),
            ctx.store.put_file(&st)?,
        );
        let structure: Vec<String> = hp.layer_structure.iter().map(|m| m.to_string()).collect();
        result.summary = format!(
            "hypernetwork `{name}` {sizes:?} {} {}: {} steps, eval loss {:.4} → {:.4}, {:.1} steps/s, {} KiB",
            structure.join("-"),
            hp.activation,
            self.steps,
            metrics.eval_loss_before,
            metrics.eval_loss_after,
            metrics.steps_per_s,
            metrics.artifact_bytes / 1024
        );
        let _ = std::fs::remove_dir_all(scratch.join("checkpoints"));
        Ok(result)
    }
}

/// What a hypernetwork checkpoint restores: weights, optimiser, state.
type HyperResume<D> = (HyperNet<D>, Optimizer<D>, TrainState);

/// The newest readable checkpoint whose settings and widths are this run's.
fn load_checkpoint<D: Device<f32>>(
    scratch: &Path,
    template: &Hypernetwork,
    kind: OptimizerKind,
    dev: &D,
    ctx: &StageContext<'_>,
) -> anyhow::Result<Option<HyperResume<D>>> {
    resume::newest(
        scratch,
        |m| ctx.progress.message(m),
        |dir| {
            let state = read_state(dir)?;
            let file = read_hypernetwork(&dir.join(Artifact::HypernetworkSafetensors.file_name()))?;
            if file.modules.keys().ne(template.modules.keys()) {
                bail!(
                    "checkpoint has widths {:?}, this run trains {:?}",
                    file.modules.keys().collect::<Vec<_>>(),
                    template.modules.keys().collect::<Vec<_>>()
                );
            }
            let mut restored = template.clone();
            restored.modules = file.modules;
            let net = HyperNet::from_host(&restored, dev)?;
            let optimizer = Optimizer::load(dev, &dir.join("optimizer.safetensors"), kind)?;
            Ok((net, optimizer, state))
        },
    )
}
