//! Stage kinds: their parameters (parsed with spans, defaulted, normalised, validated), what
//! they read from outside, and how they run.

mod artifact;
mod caption;
mod checks;
mod class_images;
mod context;
mod encode_latents;
mod encode_text;
mod instance;
mod kind;
mod merge;
pub mod model;
mod preprocess;
mod pretrain;
mod report;
mod sample_grid;
mod train;

pub use artifact::Artifact;
pub use caption::{CaptionItem, CaptionManifest, CaptionParams};
pub use class_images::ClassImagesParams;
pub use context::{Cancelled, StageContext, StageResult};
pub use encode_latents::{EncodeLatentsParams, LatentItem, LatentsManifest};
pub use encode_text::EncodeTextParams;
pub use instance::StageInstance;
pub use kind::StageKind;
pub use merge::{MergeMode, MergeParams, RECIPE_KEY};
pub use preprocess::{PreprocessItem, PreprocessManifest, PreprocessParams};
pub use pretrain::{Init as PretrainInit, PretrainParams};
pub use report::ReportParams;
pub use sample_grid::{GridCell, GridManifest, SampleGridParams};
pub use train::{DreamboothParams, LoraParams, Method, TrainMetrics, TrainParams};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::DeValue;

use crate::cache::FileHasher;
use crate::settings::PipelineSettings;

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

/// Declares the stage kinds: the [`StageParams`] enum, [`KINDS`], parsing by kind and the
/// dispatch of every [`StageKind`] method. Each variant names the type whose impl (in
/// `kind.rs`) is its row of the table.
macro_rules! stage_kinds {
    ($($variant:ident($params:ty)),+ $(,)?) => {
        /// The parameters of one stage instance, by kind.
        // A pipeline holds one value per stage instance, a handful, so the train table's size
        // (its many sweepable options) costs nothing worth a box and its indirections.
        #[allow(clippy::large_enum_variant)]
        #[derive(Debug, Clone, PartialEq, Serialize)]
        #[serde(untagged)]
        pub enum StageParams {
            $(
                #[doc = concat!("`kind = \"", stringify!($variant), "\"`, see [`", stringify!($params), "`].")]
                $variant($params),
            )+
        }

        /// The stage kinds this version knows, as written in `kind = "..."`.
        pub const KINDS: &[&str] = &[$(<$params as StageKind>::KIND),+];

        impl StageParams {
            /// Deserializes the table of a stage of `kind` (without `kind`, `needs`, `matrix`).
            pub fn parse(kind: &str, value: Spanned<DeValue<'_>>) -> Result<Self, toml::de::Error> {
                use serde::de::IntoDeserializer;
                let de = value.into_deserializer();
                $(
                    if kind == <$params as StageKind>::KIND {
                        return Ok(StageParams::$variant(Deserialize::deserialize(de)?));
                    }
                )+
                Err(serde::de::Error::custom(format!("unknown stage kind `{kind}`")))
            }

            /// Kinds a stage of `kind` must have exactly one of in its `needs`.
            pub fn required_upstream(kind: &str) -> &'static [&'static str] {
                $(
                    if kind == <$params as StageKind>::KIND {
                        return <$params as StageKind>::REQUIRED_UPSTREAM;
                    }
                )+
                &[]
            }

            /// The stage's kind.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(StageParams::$variant(_) => <$params as StageKind>::KIND,)+
                }
            }

            /// The implementation version (part of the key).
            pub fn version(&self) -> u32 {
                match self {
                    $(StageParams::$variant(_) => <$params as StageKind>::VERSION,)+
                }
            }

            /// The row of the kind table for this instance.
            fn row(&self) -> &dyn Row {
                match self {
                    $(StageParams::$variant(p) => p,)+
                }
            }

            /// [`Self::row`], mutable.
            fn row_mut(&mut self) -> &mut dyn Row {
                match self {
                    $(StageParams::$variant(p) => p,)+
                }
            }
        }
    };
}

stage_kinds! {
    Caption(CaptionParams),
    Preprocess(PreprocessParams),
    EncodeLatents(EncodeLatentsParams),
    EncodeText(EncodeTextParams),
    Train(TrainParams),
    SampleGrid(SampleGridParams),
    ClassImages(ClassImagesParams),
    Merge(MergeParams),
    Pretrain(PretrainParams),
    Report(ReportParams),
}

/// The object-safe part of [`StageKind`] (its methods without the constants), so that
/// [`StageParams`] dispatches through one exhaustive match.
trait Row {
    fn validate(&self) -> Result<(), ParamError>;
    fn normalize(&mut self, dir: &Path) -> Result<(), ParamError>;
    fn key_params(&self, settings: &PipelineSettings) -> serde_json::Value;
    fn inputs(
        &self,
        settings: &PipelineSettings,
        hasher: &FileHasher,
    ) -> anyhow::Result<BTreeMap<String, String>>;
    fn uses_model(&self) -> bool;
    fn supports_half(&self) -> bool;
    fn watch_paths(&self) -> Vec<PathBuf>;
    fn describe(&self) -> String;
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult>;
}

impl<T: StageKind> Row for T {
    fn validate(&self) -> Result<(), ParamError> {
        StageKind::validate(self)
    }
    fn normalize(&mut self, dir: &Path) -> Result<(), ParamError> {
        StageKind::normalize(self, dir)
    }
    fn key_params(&self, settings: &PipelineSettings) -> serde_json::Value {
        StageKind::key_params(self, settings)
    }
    fn inputs(
        &self,
        settings: &PipelineSettings,
        hasher: &FileHasher,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        StageKind::inputs(self, settings, hasher)
    }
    fn uses_model(&self) -> bool {
        StageKind::uses_model(self)
    }
    fn supports_half(&self) -> bool {
        StageKind::supports_half(self)
    }
    fn watch_paths(&self) -> Vec<PathBuf> {
        StageKind::watch_paths(self)
    }
    fn describe(&self) -> String {
        StageKind::describe(self)
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        StageKind::run(self, ctx)
    }
}

impl StageParams {
    /// Whether the stage runs with `precision = "f16"` (its UNet in mixed precision, or no
    /// model at all): every stage but pretraining.
    pub fn supports_half(&self) -> bool {
        self.row().supports_half()
    }

    /// The kind, and a train stage's method: `train, method textual_inversion`.
    pub fn describe(&self) -> String {
        self.row().describe()
    }

    /// Checks values serde cannot (ranges, placeholders, combinations).
    pub fn validate(&self) -> Result<(), ParamError> {
        self.row().validate()
    }

    /// Resolves relative paths against `dir` and fills derived defaults.
    pub fn normalize(&mut self, dir: &Path) -> Result<(), ParamError> {
        self.row_mut().normalize(dir)
    }

    /// The parameters as hashed into the stage key: defaulted and normalised, without file
    /// paths (their contents are inputs) and without fields that cannot change the result.
    pub fn key_params(&self, settings: &PipelineSettings) -> serde_json::Value {
        self.row().key_params(settings)
    }

    /// External files the stage reads: relative name → blake3.
    pub fn inputs(
        &self,
        settings: &PipelineSettings,
        hasher: &FileHasher,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        self.row().inputs(settings, hasher)
    }

    /// Whether the stage reads `[pipeline] base_model`.
    pub fn uses_model(&self) -> bool {
        self.row().uses_model()
    }

    /// Files and folders `watch` should observe.
    pub fn watch_paths(&self) -> Vec<PathBuf> {
        self.row().watch_paths()
    }

    /// Runs the stage.
    pub fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        self.row().run(ctx)
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
