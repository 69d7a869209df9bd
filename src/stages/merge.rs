//! `merge`: model arithmetic on trained results and checkpoints (see [`crate::merge`]).
//!
//! ```toml
//! [stage.baked]
//! kind = "merge"
//! needs = ["style"]                       # a LoRA-training stage
//! mode = "lora_into_checkpoint"
//! loras = ["style:0.8", "loras/detail.safetensors:0.3"]
//! dtype = "f16"
//! ```
//!
//! Sources (`loras`, `models`) are `NAME[:WEIGHT]`: `base` (the pipeline's `base_model`), an
//! upstream stage in `needs` (its `lora.safetensors` or `model.safetensors`), or a file (a
//! path with a `/` or a `.safetensors` extension, relative to the pipeline file, hashed into
//! the key). Modes:
//!
//! * `lora_into_checkpoint`: `loras` baked into `models[0]` (default `base`) → `model.safetensors`.
//! * `combine_loras`: `loras` into one LoRA — concatenated ranks, or an SVD to `rank` when
//!   `rank` is set → `lora.safetensors`.
//! * `extract_lora`: the LoRA of `models[0]` (tuned) against `models[1]` (default `base`), by
//!   SVD to `rank` (kohya's semantics) → `lora.safetensors`.
//! * `weighted_sum`: `(1 − alpha)·A + alpha·B` for `models = [A, B]` → `model.safetensors`.
//! * `add_difference`: `A + alpha·(B − C)` for `models = [A, B, C]` → `model.safetensors`.
//!
//! Every output carries its recipe (mode, inputs with their hashes, weights, rank) in the
//! safetensors metadata key `sdpipe_merge_recipe`, and as `recipe.json`.

use crate::stages::artifact::Artifact;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::ParamError;
use super::context::{StageContext, StageResult};
use super::model::{Component, model_inputs, open_checkpoint};
use crate::cache::{BlobRef, FileHasher, canonical_json, hash_bytes};
use crate::diffusion::Checkpoint;
use crate::formats::checkpoint::{ModelTensors, SaveDtype, write_single_file};
use crate::formats::lora::{KohyaMetadata, LoraNetwork, read_lora, write_kohya};
use crate::merge::{
    CombineMethod, ExtractOptions, ExtractTargets, add_difference, combine_loras, extract_lora,
    known_modules, known_modules_of, merge_loras, weighted_sum,
};
use crate::settings::PipelineSettings;

/// Implementation version (part of the key); bumped whenever the numbers change.
pub const VERSION: u32 = 1;

/// The safetensors metadata key holding the recipe.
pub const RECIPE_KEY: &str = "sdpipe_merge_recipe";

/// What a `merge` stage computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeMode {
    /// LoRAs baked into a checkpoint.
    LoraIntoCheckpoint,
    /// LoRAs combined into one.
    CombineLoras,
    /// A LoRA extracted from a tuned checkpoint and its base.
    ExtractLora,
    /// `(1 − alpha)·A + alpha·B`.
    WeightedSum,
    /// `A + alpha·(B − C)`.
    AddDifference,
}

impl MergeMode {
    fn name(self) -> &'static str {
        match self {
            MergeMode::LoraIntoCheckpoint => "lora_into_checkpoint",
            MergeMode::CombineLoras => "combine_loras",
            MergeMode::ExtractLora => "extract_lora",
            MergeMode::WeightedSum => "weighted_sum",
            MergeMode::AddDifference => "add_difference",
        }
    }

    fn writes_model(self) -> bool {
        matches!(
            self,
            MergeMode::LoraIntoCheckpoint | MergeMode::WeightedSum | MergeMode::AddDifference
        )
    }
}

/// `[stage.NAME] kind = "merge"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeParams {
    /// What to compute.
    pub mode: MergeMode,
    /// LoRA sources `NAME[:WEIGHT]` (weight default 1).
    #[serde(default)]
    pub loras: Vec<String>,
    /// Checkpoint sources (`base`, a stage, a file).
    #[serde(default)]
    pub models: Vec<String>,
    /// The multiplier of `weighted_sum` / `add_difference` (A1111's "Multiplier (M)").
    #[serde(default)]
    pub alpha: Option<f32>,
    /// Target rank (`extract_lora`; `combine_loras` by SVD).
    #[serde(default)]
    pub rank: Option<usize>,
    /// Rank of 3x3 conv modules (`extract_lora`: also extracts the ResNet convs).
    #[serde(default)]
    pub conv_rank: Option<usize>,
    /// Network alpha of an SVD result (default: its rank).
    #[serde(default)]
    pub network_alpha: Option<f32>,
    /// kohya's clamp quantile of SVD factors (1 disables).
    #[serde(default = "default_clamp_quantile")]
    pub clamp_quantile: f32,
    /// `extract_lora`: `attention` (default) or `all_linear` (kohya's module set).
    #[serde(default)]
    pub targets: ExtractTargets,
    /// `extract_lora`: also extract the text encoder when it changed.
    #[serde(default = "yes")]
    pub text_encoder: bool,
    /// `extract_lora`: the text encoder counts as changed above this difference (kohya: 0.01).
    #[serde(default = "default_min_diff")]
    pub min_diff: f32,
    /// Checkpoint outputs: `f16` (default) or `f32`.
    #[serde(default)]
    pub dtype: SaveDtype,
}

fn default_clamp_quantile() -> f32 {
    0.99
}
fn yes() -> bool {
    true
}
fn default_min_diff() -> f32 {
    0.01
}

/// Where a source comes from.
#[derive(Debug, Clone, PartialEq)]
enum Origin {
    Base,
    Stage(String),
    File(PathBuf),
}

/// One parsed `NAME[:WEIGHT]`.
#[derive(Debug, Clone, PartialEq)]
struct Source {
    origin: Origin,
    weight: Option<f32>,
}

fn is_file_name(s: &str) -> bool {
    s.contains('/') || s.contains('\\') || s.ends_with(".safetensors")
}

fn parse_source(text: &str) -> Result<Source, String> {
    let text = text.trim();
    let (name, weight) = match text.rsplit_once(':') {
        Some((n, w)) if !w.contains('/') && !w.contains('\\') => {
            let w: f32 = w
                .trim()
                .parse()
                .map_err(|_| format!("`{text}`: `{w}` after `:` is not a number"))?;
            if !w.is_finite() {
                return Err(format!("`{text}`: the weight is not finite"));
            }
            (n.trim(), Some(w))
        }
        _ => (text, None),
    };
    if name.is_empty() {
        return Err(format!("`{text}` names nothing"));
    }
    let origin = if name == "base" {
        Origin::Base
    } else if is_file_name(name) {
        Origin::File(PathBuf::from(name))
    } else {
        Origin::Stage(name.to_string())
    };
    Ok(Source { origin, weight })
}

impl MergeParams {
    fn sources(list: &[String]) -> Vec<Source> {
        list.iter().filter_map(|s| parse_source(s).ok()).collect()
    }

    /// The checkpoint sources with the mode's defaults filled in.
    fn model_sources(&self) -> Vec<Source> {
        let mut m = Self::sources(&self.models);
        let base = Source {
            origin: Origin::Base,
            weight: None,
        };
        match self.mode {
            MergeMode::LoraIntoCheckpoint if m.is_empty() => m.push(base),
            MergeMode::ExtractLora if m.len() == 1 => m.push(base),
            _ => {}
        }
        m
    }

    fn uses_base(&self) -> bool {
        self.model_sources()
            .iter()
            .any(|s| s.origin == Origin::Base)
    }

    pub(super) fn validate(&self) -> Result<(), ParamError> {
        for (field, list) in [("loras", &self.loras), ("models", &self.models)] {
            for s in list {
                if let Err(e) = parse_source(s) {
                    return Err(ParamError::new(
                        field,
                        e,
                        "write `NAME` or `NAME:WEIGHT`: `base`, a stage in `needs`, or a file path such as \"loras/x.safetensors\"",
                    ));
                }
            }
        }
        let models = Self::sources(&self.models);
        if models.iter().any(|s| s.weight.is_some()) {
            return Err(ParamError::new(
                "models",
                "checkpoint sources take no `:WEIGHT`",
                "weighted_sum and add_difference use `alpha`; remove the `:…` suffix",
            ));
        }
        let need = |field: &str, ok: bool, msg: &str, help: &str| {
            if ok {
                Ok(())
            } else {
                Err(ParamError::new(field, msg.to_string(), help.to_string()))
            }
        };
        let mode = self.mode.name();
        match self.mode {
            MergeMode::LoraIntoCheckpoint => {
                need(
                    "loras",
                    !self.loras.is_empty(),
                    "lora_into_checkpoint needs at least one LoRA",
                    "loras = [\"my_lora_stage:1.0\"]",
                )?;
                need(
                    "models",
                    models.len() <= 1,
                    "lora_into_checkpoint merges into one model",
                    "models = [\"base\"] (the default) or one stage / file",
                )?;
            }
            MergeMode::CombineLoras => need(
                "loras",
                self.loras.len() >= 2,
                "combine_loras needs at least two LoRAs",
                "loras = [\"a:0.7\", \"b:0.3\"]",
            )?,
            MergeMode::ExtractLora => {
                need(
                    "models",
                    (1..=2).contains(&models.len()),
                    "extract_lora needs the tuned model (and optionally its base)",
                    "models = [\"dreambooth_stage\"] or [\"tuned.safetensors\", \"base\"]",
                )?;
                need(
                    "rank",
                    self.rank.is_some(),
                    "extract_lora needs a `rank`",
                    "rank = 16 (kohya's default dim is 4; 8-64 are common)",
                )?;
            }
            MergeMode::WeightedSum | MergeMode::AddDifference => {
                let n = if self.mode == MergeMode::WeightedSum {
                    2
                } else {
                    3
                };
                need(
                    "models",
                    models.len() == n,
                    &format!("{mode} needs exactly {n} models, got {}", models.len()),
                    if n == 2 {
                        "models = [\"base\", \"other_stage\"]  # A, B"
                    } else {
                        "models = [\"base\", \"tuned.safetensors\", \"tuned_base.safetensors\"]  # A, B, C"
                    },
                )?;
                need(
                    "alpha",
                    self.alpha.is_some_and(f32::is_finite),
                    &format!("{mode} needs a finite `alpha`"),
                    "alpha = 0.5 (A1111's multiplier M)",
                )?;
            }
        }
        if self.mode == MergeMode::CombineLoras && !self.models.is_empty() {
            return Err(ParamError::new(
                "models",
                format!("{mode} takes no `models`"),
                "remove `models`",
            ));
        }
        if self.mode != MergeMode::LoraIntoCheckpoint && self.mode != MergeMode::CombineLoras {
            need(
                "loras",
                self.loras.is_empty(),
                &format!("{mode} takes no `loras`"),
                "remove `loras`",
            )?;
        }
        need(
            "rank",
            self.rank != Some(0),
            "rank must be positive",
            "e.g. rank = 16",
        )?;
        need(
            "conv_rank",
            self.conv_rank != Some(0),
            "conv_rank must be positive",
            "leave it out to skip the convolutions",
        )?;
        need(
            "clamp_quantile",
            self.clamp_quantile > 0.0 && self.clamp_quantile <= 1.0,
            "clamp_quantile must be in (0, 1]",
            "kohya uses 0.99; 1 disables the clamp",
        )?;
        need(
            "network_alpha",
            self.network_alpha.is_none_or(|a| a.is_finite() && a > 0.0),
            "network_alpha must be positive",
            "leave it out for alpha = rank",
        )?;
        Ok(())
    }

    /// Resolves file sources against the pipeline directory and checks they exist.
    pub(super) fn normalize(&mut self, dir: &Path) -> Result<(), ParamError> {
        for (field, list) in [("loras", &mut self.loras), ("models", &mut self.models)] {
            for entry in list.iter_mut() {
                let Ok(Source {
                    origin: Origin::File(p),
                    weight,
                }) = parse_source(entry)
                else {
                    continue;
                };
                let full = if p.is_absolute() { p } else { dir.join(p) };
                if !full.exists() {
                    return Err(ParamError::new(
                        field,
                        format!("{} does not exist", full.display()),
                        "give a path relative to the pipeline file, or the name of a stage in `needs`",
                    ));
                }
                *entry = match weight {
                    Some(w) => format!("{}:{w}", full.display()),
                    None => full.display().to_string(),
                };
            }
        }
        Ok(())
    }

    pub(super) fn key_params(&self, settings: &PipelineSettings) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        // file paths are replaced by their position: their contents are inputs
        let describe = |list: &[String], kind: &str| -> serde_json::Value {
            list.iter()
                .enumerate()
                .map(|(i, s)| match parse_source(s) {
                    Ok(Source {
                        origin: Origin::File(_),
                        weight,
                    }) => serde_json::json!({"file": input_name(kind, i), "weight": weight}),
                    Ok(Source {
                        origin: Origin::Stage(n),
                        weight,
                    }) => serde_json::json!({"stage": n, "weight": weight}),
                    _ => serde_json::json!({"base": true}),
                })
                .collect()
        };
        if let Some(map) = v.as_object_mut() {
            map.insert("loras".into(), describe(&self.loras, "loras"));
            map.insert("models".into(), describe(&self.models, "models"));
            map.insert("seed".into(), settings.seed.into());
        }
        v
    }

    /// Whether the stage reads `[pipeline] base_model`.
    pub(super) fn uses_model(&self) -> bool {
        self.uses_base()
    }

    pub(super) fn inputs(
        &self,
        settings: &PipelineSettings,
        hasher: &FileHasher,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        // the base model's files (its configs describe single-file inputs too)
        let mut inputs = model_inputs(settings, hasher, Self::components())?;
        for (kind, list) in [("loras", &self.loras), ("models", &self.models)] {
            for (i, s) in list.iter().enumerate() {
                if let Ok(Source {
                    origin: Origin::File(p),
                    ..
                }) = parse_source(s)
                {
                    inputs.insert(
                        input_name(kind, i),
                        hasher
                            .hash_file(&p)
                            .with_context(|| format!("cannot read {}", p.display()))?,
                    );
                }
            }
        }
        Ok(inputs)
    }

    pub(super) fn components() -> &'static [Component] {
        &[Component::Unet, Component::Vae, Component::TextEncoder]
    }

    pub(super) fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        let started = std::time::Instant::now();
        let settings = &ctx.settings;
        let scratch = ctx.scratch()?;
        std::fs::create_dir_all(&scratch)?;
        let mut recipe_inputs = Vec::new();
        let mut result = StageResult::default();
        let mode = self.mode.name();
        // every named stage must be upstream with the right output, before any heavy reading
        for (field, file, sources) in [
            ("models", Artifact::Checkpoint, self.model_sources()),
            ("loras", Artifact::Lora, Self::sources(&self.loras)),
        ] {
            for src in sources {
                if let Origin::Stage(name) = &src.origin {
                    output(upstream_record(ctx, name, file, field)?, name, file)?;
                }
            }
        }

        // The checkpoints, opened (memory-mapped) and described.
        let mut checkpoints = Vec::new();
        for (i, src) in self.model_sources().iter().enumerate() {
            let (ckpt, desc) = self.open_model(ctx, src, i)?;
            recipe_inputs.push(desc);
            checkpoints.push(ckpt);
        }
        let lora_sources = Self::sources(&self.loras);
        let load_loras = |known: Option<&crate::formats::lora::KnownModules>,
                          recipe: &mut Vec<serde_json::Value>|
         -> anyhow::Result<Vec<(String, LoraNetwork, f32)>> {
            let mut out = Vec::new();
            for (i, src) in lora_sources.iter().enumerate() {
                let (name, path, digest, _tmp) = self.lora_file(ctx, src, i)?;
                let (net, _) =
                    read_lora(&path, known).with_context(|| format!("reading LoRA `{name}`"))?;
                let weight = src.weight.unwrap_or(1.0);
                recipe.push(serde_json::json!({
                    "role": "lora", "source": name, "blake3": digest, "weight": weight,
                    "modules": net.len(),
                }));
                out.push((name, net, weight));
            }
            Ok(out)
        };

        let mut recipe = serde_json::json!({
            "mode": mode,
            "tool": format!("sdpipe {}", env!("CARGO_PKG_VERSION")),
        });
        let summary;
        if self.mode.writes_model() {
            let read = |c: &Checkpoint| -> anyhow::Result<ModelTensors> {
                ModelTensors::read(c).with_context(|| format!("reading {}", c.path.display()))
            };
            let first = checkpoints.first().context("no model to merge into")?;
            let mut a = read(first)?;
            let detail = match self.mode {
                MergeMode::LoraIntoCheckpoint => {
                    let known = known_modules(&a);
                    let loras = load_loras(Some(&known), &mut recipe_inputs)?;
                    let refs: Vec<(&str, &LoraNetwork, f32)> =
                        loras.iter().map(|(n, l, w)| (n.as_str(), l, *w)).collect();
                    let changed = merge_loras(&mut a, &refs)?;
                    let names: Vec<String> =
                        loras.iter().map(|(n, _, w)| format!("{n} ×{w}")).collect();
                    format!(
                        "{} into the model ({changed} weights changed)",
                        names.join(", ")
                    )
                }
                MergeMode::WeightedSum => {
                    let alpha = self.alpha.unwrap_or(0.5);
                    let b = read(&checkpoints[1])?;
                    let report = weighted_sum(&mut a, &b, alpha)?;
                    recipe["alpha"] = alpha.into();
                    format!(
                        "(1 − {alpha})·A + {alpha}·B over {} tensors ({} kept from A)",
                        report.merged, report.kept_from_a
                    )
                }
                _ => {
                    let alpha = self.alpha.unwrap_or(1.0);
                    let b = read(&checkpoints[1])?;
                    let c = read(&checkpoints[2])?;
                    let report = add_difference(&mut a, &b, &c, alpha)?;
                    recipe["alpha"] = alpha.into();
                    format!(
                        "A + {alpha}·(B − C) over {} tensors ({} kept from A)",
                        report.merged, report.kept_from_a
                    )
                }
            };
            recipe["inputs"] = recipe_inputs.clone().into();
            recipe["dtype"] = serde_json::to_value(self.dtype)?;
            let recipe_text = canonical_json(&recipe);
            let meta: BTreeMap<String, String> = [
                (RECIPE_KEY.to_string(), recipe_text.clone()),
                ("format".to_string(), "pt".to_string()),
            ]
            .into();
            let out = scratch.join(Artifact::Checkpoint.file_name());
            write_single_file(&out, &a, &first.configs(), self.dtype, &meta)?;
            let blob = ctx.store.put_file(&out)?;
            let _ = std::fs::remove_file(&out);
            summary = format!(
                "{mode}: {detail} → model.safetensors ({}, {:.1} MiB)",
                self.dtype.name(),
                blob.size as f64 / (1 << 20) as f64
            );
            result
                .outputs
                .insert(Artifact::Checkpoint.file_name().into(), blob);
        } else {
            let (network, detail) = match self.mode {
                MergeMode::CombineLoras => {
                    let known = match &settings.base_model {
                        Some(_) => Some(known_modules_of(&open_checkpoint(settings)?)),
                        None => None,
                    };
                    let loras = load_loras(known.as_ref(), &mut recipe_inputs)?;
                    let refs: Vec<(&LoraNetwork, f32)> =
                        loras.iter().map(|(_, l, w)| (l, *w)).collect();
                    let method = match self.rank {
                        Some(rank) => CombineMethod::Svd {
                            rank,
                            conv_rank: self.conv_rank,
                            alpha: self.network_alpha,
                            clamp_quantile: self.clamp_quantile,
                            seed: settings.seed,
                        },
                        None => CombineMethod::Concat,
                    };
                    let net = combine_loras(&refs, method)?;
                    let how = match self.rank {
                        Some(r) => format!("SVD to rank {r}"),
                        None => "concatenated ranks".to_string(),
                    };
                    (net, format!("{} LoRAs, {how}", loras.len()))
                }
                _ => {
                    let tuned = ModelTensors::read(&checkpoints[0])?;
                    let base = ModelTensors::read(&checkpoints[1])?;
                    let opts = ExtractOptions {
                        rank: self.rank.unwrap_or(4),
                        conv_rank: self.conv_rank,
                        alpha: self.network_alpha,
                        targets: self.targets,
                        text_encoder: self.text_encoder,
                        min_diff: self.min_diff,
                        clamp_quantile: self.clamp_quantile,
                        seed: settings.seed,
                    };
                    let (net, report) = extract_lora(&tuned, &base, &opts)?;
                    result
                        .stats
                        .insert("relative_error".into(), report.relative_error.into());
                    (
                        net,
                        format!(
                            "rank {}: {} UNet + {} text-encoder modules, relative error {:.4}",
                            opts.rank,
                            report.unet_modules,
                            report.text_encoder_modules,
                            report.relative_error
                        ),
                    )
                }
            };
            recipe["inputs"] = recipe_inputs.clone().into();
            recipe["rank"] = serde_json::to_value(self.rank)?;
            if let Some(c) = self.conv_rank {
                recipe["conv_rank"] = c.into();
            }
            recipe["clamp_quantile"] = self.clamp_quantile.into();
            let recipe_text = canonical_json(&recipe);
            let mut extra: BTreeMap<String, String> =
                [(RECIPE_KEY.to_string(), recipe_text.clone())].into();
            if let Some(c) = self.conv_rank {
                // kohya's LoCon arguments, which loaders read for the conv modules' scale
                let conv_alpha = self.network_alpha.unwrap_or(c as f32);
                extra.insert(
                    "ss_network_args".into(),
                    serde_json::json!({"conv_dim": c.to_string(), "conv_alpha": conv_alpha.to_string()})
                        .to_string(),
                );
            }
            let base_file = settings.base_model.as_ref().filter(|p| p.is_file());
            let meta = KohyaMetadata {
                base_model_name: settings
                    .base_model
                    .as_ref()
                    .and_then(|p| p.file_stem())
                    .map(|s| s.to_string_lossy().into_owned()),
                base_model_hash: base_file.and_then(|p| crate::sample::short_model_hash(p).ok()),
                output_name: Some(ctx.instance.name.clone()),
                training_comment: Some(format!("sdpipe merge ({mode})")),
                extra,
                ..KohyaMetadata::default()
            };
            let out = scratch.join(Artifact::Lora.file_name());
            write_kohya(&out, &network, &meta)?;
            let blob = ctx.store.put_file(&out)?;
            let _ = std::fs::remove_file(&out);
            summary = format!(
                "{mode}: {detail} → lora.safetensors ({} modules, {} KiB)",
                network.len(),
                blob.size / 1024
            );
            result
                .outputs
                .insert(Artifact::Lora.file_name().into(), blob);
        }
        result.outputs.insert(
            "recipe.json".into(),
            ctx.store.put_bytes(&serde_json::to_vec_pretty(&recipe)?)?,
        );
        result
            .stats
            .insert("wall_s".into(), started.elapsed().as_secs_f64().into());
        result.summary = summary;
        Ok(result)
    }

    /// Opens checkpoint source `src` (number `i`), with its recipe entry.
    fn open_model(
        &self,
        ctx: &StageContext<'_>,
        src: &Source,
        i: usize,
    ) -> anyhow::Result<(Checkpoint, serde_json::Value)> {
        let settings = &ctx.settings;
        match &src.origin {
            Origin::Base => {
                let ckpt = open_checkpoint(settings)?;
                let inputs = model_inputs(settings, ctx.hasher, Self::components())?;
                let digest = hash_bytes(canonical_json(&serde_json::to_value(&inputs)?).as_bytes());
                Ok((
                    ckpt,
                    serde_json::json!({"role": "model", "source": "base", "blake3": digest}),
                ))
            }
            Origin::Stage(name) => {
                let record = upstream_record(ctx, name, Artifact::Checkpoint, "models")?;
                let blob = output(record, name, Artifact::Checkpoint)?;
                let ckpt = open_model_blob(ctx, blob)?;
                Ok((
                    ckpt,
                    serde_json::json!({"role": "model", "source": name, "blake3": blob.digest}),
                ))
            }
            Origin::File(p) => {
                let ckpt = open_model_file(settings, p)?;
                let digest = ctx.hasher.hash_file(p)?;
                Ok((
                    ckpt,
                    serde_json::json!({"role": "model", "source": input_name("models", i), "file": p.file_name().map(|f| f.to_string_lossy().into_owned()), "blake3": digest}),
                ))
            }
        }
    }

    /// The file of LoRA source `src`: (name, path, blake3, temp file keeping it alive).
    fn lora_file(
        &self,
        ctx: &StageContext<'_>,
        src: &Source,
        i: usize,
    ) -> anyhow::Result<(String, PathBuf, String, Option<tempfile::NamedTempFile>)> {
        match &src.origin {
            Origin::Stage(name) => {
                let record = upstream_record(ctx, name, Artifact::Lora, "loras")?;
                let blob = output(record, name, Artifact::Lora)?;
                let tmp = tempfile::Builder::new().suffix(".safetensors").tempfile()?;
                std::fs::write(tmp.path(), ctx.store.read_blob(blob)?)?;
                Ok((
                    name.clone(),
                    tmp.path().to_path_buf(),
                    blob.digest.clone(),
                    Some(tmp),
                ))
            }
            Origin::File(p) => Ok((
                p.file_stem()
                    .map_or(input_name("loras", i), |s| s.to_string_lossy().into_owned()),
                p.clone(),
                ctx.hasher.hash_file(p)?,
                None,
            )),
            Origin::Base => bail!("`base` is a checkpoint, not a LoRA: list it in `models`"),
        }
    }
}

fn input_name(kind: &str, i: usize) -> String {
    format!("merge/{kind}/{i}")
}

/// The upstream record of stage `name` (an instance or base name in `needs`).
fn upstream_record<'a>(
    ctx: &'a StageContext<'_>,
    name: &str,
    wanted: Artifact,
    field: &str,
) -> anyhow::Result<&'a crate::cache::Record> {
    let wanted = wanted.file_name();
    let found: Vec<_> = ctx
        .upstream
        .iter()
        .filter(|(i, _)| i.name == name || i.base == name)
        .collect();
    match found.as_slice() {
        [(_, r)] => Ok(r),
        [] => {
            let have: Vec<&str> = ctx.upstream.iter().map(|(i, _)| i.name.as_str()).collect();
            bail!(
                "stage `{}`: `{name}` in `{field}` is not a stage in its `needs` (it needs: {}); add it to `needs`, or give a file path (with a `/` or the .safetensors extension) for its {wanted}",
                ctx.instance.name,
                if have.is_empty() {
                    "nothing".to_string()
                } else {
                    have.join(", ")
                }
            )
        }
        many => bail!(
            "stage `{}`: `{name}` in `{field}` selects {} instances; name one (e.g. `{}`)",
            ctx.instance.name,
            many.len(),
            many[0].0.name
        ),
    }
}

fn output<'a>(
    record: &'a crate::cache::Record,
    name: &str,
    file: Artifact,
) -> anyhow::Result<&'a BlobRef> {
    let file = file.file_name();
    record.outputs.get(file).with_context(|| {
        let have: Vec<&str> = record.outputs.keys().map(String::as_str).collect();
        format!(
            "stage `{name}` has no `{file}` output (it has: {})",
            have.join(", ")
        )
    })
}

/// The folder whose configs describe single-file checkpoints of this pipeline's architecture:
/// `[pipeline] model_config`, or the base model when it is a diffusers folder.
pub(super) fn config_dir(settings: &PipelineSettings) -> Option<PathBuf> {
    settings
        .model_config
        .clone()
        .or_else(|| settings.base_model.clone().filter(|p| p.is_dir()))
}

/// Opens a checkpoint file (or folder) with this pipeline's configs.
pub(super) fn open_model_file(
    settings: &PipelineSettings,
    path: &Path,
) -> anyhow::Result<Checkpoint> {
    let mut ckpt =
        Checkpoint::open(path).with_context(|| format!("cannot open model {}", path.display()))?;
    if ckpt.layout == crate::diffusion::CheckpointLayout::SingleFile
        && let Some(dir) = config_dir(settings)
    {
        ckpt = ckpt
            .with_configs_from(&dir)
            .with_context(|| format!("cannot read model configs from {}", dir.display()))?;
    }
    Ok(ckpt)
}

/// Opens the `model.safetensors` blob of an upstream stage (memory-mapped in the store).
pub(super) fn open_model_blob(
    ctx: &StageContext<'_>,
    blob: &BlobRef,
) -> anyhow::Result<Checkpoint> {
    let path = ctx.store.blob_path(&blob.digest);
    let size = std::fs::metadata(&path)
        .with_context(|| format!("the cached model {} is missing", path.display()))?
        .len();
    if size != blob.size {
        bail!(
            "the cached model {} has {size} bytes, its record says {}",
            path.display(),
            blob.size
        );
    }
    open_model_file(ctx.settings, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_names_files_and_weights() {
        let s = parse_source("style:0.5").unwrap();
        assert_eq!(s.origin, Origin::Stage("style".into()));
        assert_eq!(s.weight, Some(0.5));
        assert_eq!(parse_source("base").unwrap().origin, Origin::Base);
        let f = parse_source("loras/a.safetensors:-1").unwrap();
        assert_eq!(f.origin, Origin::File("loras/a.safetensors".into()));
        assert_eq!(f.weight, Some(-1.0));
        assert_eq!(
            parse_source("x.safetensors").unwrap().origin,
            Origin::File("x.safetensors".into())
        );
        assert!(parse_source("style:lots").unwrap_err().contains("lots"));
        assert!(parse_source(":1").is_err());
    }
}
