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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

mod run;

use run::input_name;
pub(super) use run::{config_dir, open_model_blob};

use super::ParamError;
use super::model::{Component, model_inputs};
use crate::cache::FileHasher;
use crate::formats::checkpoint::SaveDtype;
use crate::merge::ExtractTargets;
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
