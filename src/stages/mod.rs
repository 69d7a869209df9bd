//! Stage kinds: their parameters (parsed with spans, defaulted, normalised, validated), what
//! they read from outside, and how they run.

mod caption;
mod checks;
mod class_images;
mod context;
mod encode_latents;
mod merge;
pub mod model;
mod preprocess;
mod report;
mod sample_grid;
mod train;

pub use caption::{CaptionItem, CaptionManifest, CaptionParams};
pub use class_images::ClassImagesParams;
pub use context::{Cancelled, StageContext, StageResult};
pub use encode_latents::{EncodeLatentsParams, LatentItem, LatentsManifest};
pub use merge::{MergeMode, MergeParams, RECIPE_KEY};
pub use preprocess::{PreprocessItem, PreprocessManifest, PreprocessParams};
pub use report::ReportParams;
pub use sample_grid::{GridCell, GridManifest, SampleGridParams};
pub use train::pretrain::Init as PretrainInit;
pub use train::{DreamboothParams, LoraParams, Method, PretrainParams, TrainMetrics, TrainParams};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::DeValue;

use crate::cache::FileHasher;
use crate::pipeline::PipelineSettings;
use model::Component;
use train::pretrain::Init;

/// The stage kinds this version knows, as written in `kind = "..."`.
pub const KINDS: &[&str] = &[
    "caption",
    "preprocess",
    "encode_latents",
    "train",
    "sample_grid",
    "class_images",
    "merge",
    "pretrain",
    "report",
];

/// A parameter problem found after parsing, reported at the key `field` (dotted).
#[derive(Debug, Clone)]
pub struct ParamError {
    /// Dotted key inside the stage table.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub help: Option<String>,
}

impl ParamError {
    pub(crate) fn new(field: &str, message: impl Into<String>, help: impl Into<String>) -> Self {
        ParamError {
            field: field.into(),
            message: message.into(),
            help: Some(help.into()),
        }
    }
}

/// The parameters of one stage instance, by kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum StageParams {
    /// `kind = "caption"`.
    Caption(CaptionParams),
    /// `kind = "preprocess"`.
    Preprocess(PreprocessParams),
    /// `kind = "encode_latents"`.
    EncodeLatents(EncodeLatentsParams),
    /// `kind = "sample_grid"`.
    SampleGrid(SampleGridParams),
    /// `kind = "train"`.
    Train(TrainParams),
    /// `kind = "class_images"`.
    ClassImages(ClassImagesParams),
    /// `kind = "merge"`.
    Merge(MergeParams),
    /// `kind = "pretrain"`.
    Pretrain(PretrainParams),
    /// `kind = "report"`.
    Report(ReportParams),
}

impl StageParams {
    /// Deserializes the table of a stage of `kind` (without `kind`, `needs`, `matrix`).
    pub fn parse(kind: &str, value: Spanned<DeValue<'_>>) -> Result<Self, toml::de::Error> {
        use serde::de::IntoDeserializer;
        let de = value.into_deserializer();
        Ok(match kind {
            "caption" => StageParams::Caption(Deserialize::deserialize(de)?),
            "preprocess" => StageParams::Preprocess(Deserialize::deserialize(de)?),
            "encode_latents" => StageParams::EncodeLatents(Deserialize::deserialize(de)?),
            "sample_grid" => StageParams::SampleGrid(Deserialize::deserialize(de)?),
            "class_images" => StageParams::ClassImages(Deserialize::deserialize(de)?),
            "train" => StageParams::Train(Deserialize::deserialize(de)?),
            "merge" => StageParams::Merge(Deserialize::deserialize(de)?),
            "pretrain" => StageParams::Pretrain(Deserialize::deserialize(de)?),
            "report" => StageParams::Report(Deserialize::deserialize(de)?),
            other => {
                return Err(serde::de::Error::custom(format!(
                    "unknown stage kind `{other}`"
                )));
            }
        })
    }

    /// Whether the stage runs with `precision = "f16"` (its UNet in mixed precision, or no
    /// model at all): every stage but pretraining and the train methods other than LoRA.
    pub fn supports_half(&self) -> bool {
        match self {
            StageParams::Train(p) => p.supports_half(),
            StageParams::Pretrain(_) => false,
            _ => true,
        }
    }

    /// The kind, and a train stage's method: `train, method textual_inversion`.
    pub fn describe(&self) -> String {
        match self {
            StageParams::Train(p) => format!(
                "train, method {}",
                serde_json::to_value(p.method)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            ),
            other => other.kind().to_string(),
        }
    }

    /// The stage's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            StageParams::Caption(_) => "caption",
            StageParams::Preprocess(_) => "preprocess",
            StageParams::EncodeLatents(_) => "encode_latents",
            StageParams::SampleGrid(_) => "sample_grid",
            StageParams::Train(_) => "train",
            StageParams::ClassImages(_) => "class_images",
            StageParams::Merge(_) => "merge",
            StageParams::Pretrain(_) => "pretrain",
            StageParams::Report(_) => "report",
        }
    }

    /// Implementation version of the kind: bumped by hand whenever its results change.
    pub fn version(&self) -> u32 {
        match self {
            StageParams::Caption(_) => caption::VERSION,
            StageParams::Preprocess(_) => preprocess::VERSION,
            StageParams::EncodeLatents(_) => encode_latents::VERSION,
            StageParams::SampleGrid(_) => sample_grid::VERSION,
            StageParams::Train(_) => train::VERSION,
            StageParams::ClassImages(_) => class_images::VERSION,
            StageParams::Merge(_) => merge::VERSION,
            StageParams::Pretrain(_) => train::pretrain::VERSION,
            StageParams::Report(_) => report::VERSION,
        }
    }

    /// Kinds a stage of `kind` must have exactly one of in its `needs`.
    pub fn required_upstream(kind: &str) -> &'static [&'static str] {
        match kind {
            "preprocess" => &["caption"],
            "encode_latents" => &["preprocess"],
            "train" => &["encode_latents"],
            "report" => &["sample_grid"],
            _ => &[],
        }
    }

    /// Checks values serde cannot (ranges, placeholders, combinations).
    pub fn validate(&self) -> Result<(), ParamError> {
        match self {
            StageParams::Caption(p) => p.validate(),
            StageParams::Preprocess(p) => p.validate(),
            StageParams::EncodeLatents(p) => p.validate(),
            StageParams::SampleGrid(p) => p.validate(),
            StageParams::Train(p) => p.validate(),
            StageParams::ClassImages(p) => p.validate(),
            StageParams::Merge(p) => p.validate(),
            StageParams::Pretrain(p) => p.validate(),
            StageParams::Report(p) => p.validate(),
        }
    }

    /// Resolves relative paths against `dir` and fills derived defaults.
    pub fn normalize(&mut self, dir: &Path) -> Result<(), ParamError> {
        match self {
            StageParams::Caption(p) => p.normalize(dir),
            StageParams::Preprocess(p) => {
                p.normalize();
                Ok(())
            }
            StageParams::Train(p) => {
                p.normalize();
                Ok(())
            }
            StageParams::Merge(p) => p.normalize(dir),
            StageParams::EncodeLatents(_)
            | StageParams::SampleGrid(_)
            | StageParams::ClassImages(_)
            | StageParams::Pretrain(_)
            | StageParams::Report(_) => Ok(()),
        }
    }

    /// The parameters as hashed into the stage key: defaulted and normalised, without file
    /// paths (their contents are inputs) and without fields that cannot change the result.
    pub fn key_params(&self, settings: &PipelineSettings) -> serde_json::Value {
        match self {
            StageParams::Caption(p) => p.key_params(),
            StageParams::Preprocess(p) => p.key_params(settings),
            StageParams::EncodeLatents(p) => p.key_params(settings),
            StageParams::SampleGrid(p) => p.key_params(settings),
            StageParams::Train(p) => p.key_params(settings),
            StageParams::ClassImages(p) => p.key_params(settings),
            StageParams::Merge(p) => p.key_params(settings),
            StageParams::Pretrain(p) => p.key_params(),
            StageParams::Report(p) => p.key_params(settings),
        }
    }

    /// External files the stage reads: relative name → blake3.
    pub fn inputs(
        &self,
        settings: &PipelineSettings,
        hasher: &FileHasher,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        match self {
            StageParams::Caption(p) => p.inputs(hasher),
            StageParams::Preprocess(_) => Ok(BTreeMap::new()),
            StageParams::Pretrain(p) if p.init == Init::BaseModel => model::model_inputs(
                settings,
                hasher,
                &[Component::Unet, Component::Vae, Component::TextEncoder],
            ),
            StageParams::Pretrain(_) => Ok(BTreeMap::new()),
            StageParams::EncodeLatents(_) => {
                model::model_inputs(settings, hasher, EncodeLatentsParams::components())
            }
            StageParams::SampleGrid(_) => {
                model::model_inputs(settings, hasher, SampleGridParams::components())
            }
            StageParams::Train(_) => {
                model::model_inputs(settings, hasher, TrainParams::components())
            }
            StageParams::ClassImages(_) => {
                model::model_inputs(settings, hasher, ClassImagesParams::components())
            }
            StageParams::Merge(p) => p.inputs(settings, hasher),
            StageParams::Report(_) => Ok(BTreeMap::new()),
        }
    }

    /// Whether the stage reads `[pipeline] base_model`.
    pub fn uses_model(&self) -> bool {
        match self {
            StageParams::Merge(p) => p.uses_model(),
            StageParams::Pretrain(p) => p.init == Init::BaseModel,
            _ => matches!(
                self,
                StageParams::EncodeLatents(_)
                    | StageParams::SampleGrid(_)
                    | StageParams::Train(_)
                    | StageParams::ClassImages(_)
            ),
        }
    }

    /// Files and folders `watch` should observe.
    pub fn watch_paths(&self) -> Vec<PathBuf> {
        match self {
            StageParams::Caption(p) => vec![p.images.clone()],
            StageParams::Preprocess(_)
            | StageParams::EncodeLatents(_)
            | StageParams::SampleGrid(_)
            | StageParams::Train(_)
            | StageParams::ClassImages(_)
            | StageParams::Merge(_)
            | StageParams::Pretrain(_)
            | StageParams::Report(_) => Vec::new(),
        }
    }

    /// Runs the stage.
    pub fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        match self {
            StageParams::Caption(p) => p.run(ctx),
            StageParams::Preprocess(p) => p.run(ctx),
            StageParams::EncodeLatents(p) => p.run(ctx),
            StageParams::SampleGrid(p) => p.run(ctx),
            StageParams::Train(p) => p.run(ctx),
            StageParams::ClassImages(p) => p.run(ctx),
            StageParams::Merge(p) => p.run(ctx),
            StageParams::Pretrain(p) => p.run(ctx),
            StageParams::Report(p) => p.run(ctx),
        }
    }
}

/// What kind of thing an input file is, for plan reasons ("2 images added").
pub fn input_noun(name: &str) -> &'static str {
    let ext = Path::new(name)
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if crate::image::IMAGE_EXTENSIONS.contains(&ext.as_str()) {
        "image"
    } else if ext == "txt" || ext == "caption" {
        "caption file"
    } else {
        "input file"
    }
}
