//! The table of stage kinds: one [`StageKind`] impl per kind says what its parameters mean to
//! the engine (name, version, required upstream, key, inputs, model use, precision) and how it
//! runs. Adding a kind is a type with this impl plus one line in `stage_kinds!` (`mod.rs`); the
//! compiler then checks every dispatch, with no `_ =>` arm to forget it in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::model::{self, Component};
use super::pretrain::{self, Init};
use super::{
    CaptionParams, ClassImagesParams, EncodeLatentsParams, EncodeTextParams, MergeParams,
    ParamError, PreprocessParams, PretrainParams, ReportParams, SampleGridParams, StageContext,
    StageResult, TrainParams, caption, class_images, encode_latents, encode_text, merge,
    preprocess, report, sample_grid, train,
};
use crate::cache::FileHasher;
use crate::settings::PipelineSettings;

/// One stage kind.
pub trait StageKind {
    /// As written in `kind = "..."`.
    const KIND: &'static str;
    /// The implementation version, part of every key: bump it when the same parameters and
    /// inputs would give other outputs.
    const VERSION: u32;
    /// Kinds the stage must have exactly one of in `needs` (default: none).
    const REQUIRED_UPSTREAM: &'static [&'static str] = &[];

    /// Checks values serde cannot (ranges, placeholders, combinations).
    fn validate(&self) -> Result<(), ParamError>;
    /// Resolves relative paths against `dir` (the pipeline file's folder) and fills derived
    /// defaults (default: nothing to do).
    fn normalize(&mut self, _dir: &Path) -> Result<(), ParamError> {
        Ok(())
    }
    /// The parameters as hashed into the key: defaulted and normalised, without file paths
    /// (their contents are inputs) and without fields that cannot change the result.
    fn key_params(&self, settings: &PipelineSettings) -> serde_json::Value;
    /// External files the stage reads: relative name → blake3.
    fn inputs(
        &self,
        settings: &PipelineSettings,
        hasher: &FileHasher,
    ) -> anyhow::Result<BTreeMap<String, String>>;
    /// Whether the stage reads `[pipeline] base_model`.
    fn uses_model(&self) -> bool;
    /// Whether it runs with `precision = "f16"` (its UNet in mixed precision, or no model;
    /// default: yes).
    fn supports_half(&self) -> bool {
        true
    }
    /// Files and folders `watch` should observe.
    fn watch_paths(&self) -> Vec<PathBuf> {
        Vec::new()
    }
    /// The kind in words, for messages (`train, method lora`).
    fn describe(&self) -> String {
        Self::KIND.to_string()
    }
    /// Runs the stage.
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult>;
}

/// The base model's files, hashed: the inputs of a stage that reads `components` of it.
fn model_files(
    settings: &PipelineSettings,
    hasher: &FileHasher,
    components: &[Component],
) -> anyhow::Result<BTreeMap<String, String>> {
    model::model_inputs(settings, hasher, components)
}

impl StageKind for CaptionParams {
    const KIND: &'static str = "caption";
    const VERSION: u32 = caption::VERSION;
    fn validate(&self) -> Result<(), ParamError> {
        CaptionParams::validate(self)
    }
    fn normalize(&mut self, dir: &Path) -> Result<(), ParamError> {
        CaptionParams::normalize(self, dir)
    }
    fn key_params(&self, _: &PipelineSettings) -> serde_json::Value {
        CaptionParams::key_params(self)
    }
    fn inputs(
        &self,
        _: &PipelineSettings,
        hasher: &FileHasher,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        CaptionParams::inputs(self, hasher)
    }
    fn uses_model(&self) -> bool {
        false
    }
    fn watch_paths(&self) -> Vec<PathBuf> {
        vec![self.images.clone()]
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        CaptionParams::run(self, ctx)
    }
}

impl StageKind for PreprocessParams {
    const KIND: &'static str = "preprocess";
    const VERSION: u32 = preprocess::VERSION;
    const REQUIRED_UPSTREAM: &'static [&'static str] = &["caption"];
    fn validate(&self) -> Result<(), ParamError> {
        PreprocessParams::validate(self)
    }
    fn normalize(&mut self, _: &Path) -> Result<(), ParamError> {
        PreprocessParams::normalize(self);
        Ok(())
    }
    fn key_params(&self, settings: &PipelineSettings) -> serde_json::Value {
        PreprocessParams::key_params(self, settings)
    }
    fn inputs(
        &self,
        _: &PipelineSettings,
        _: &FileHasher,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        // its images come through the caption stage's manifest, with their hashes
        Ok(BTreeMap::new())
    }
    fn uses_model(&self) -> bool {
        false
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        PreprocessParams::run(self, ctx)
    }
}

impl StageKind for EncodeLatentsParams {
    const KIND: &'static str = "encode_latents";
    const VERSION: u32 = encode_latents::VERSION;
    const REQUIRED_UPSTREAM: &'static [&'static str] = &["preprocess"];
    fn validate(&self) -> Result<(), ParamError> {
        EncodeLatentsParams::validate(self)
    }
    fn key_params(&self, settings: &PipelineSettings) -> serde_json::Value {
        EncodeLatentsParams::key_params(self, settings)
    }
    fn inputs(
        &self,
        settings: &PipelineSettings,
        hasher: &FileHasher,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        model_files(settings, hasher, EncodeLatentsParams::components())
    }
    fn uses_model(&self) -> bool {
        true
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        EncodeLatentsParams::run(self, ctx)
    }
}

impl StageKind for EncodeTextParams {
    const KIND: &'static str = "encode_text";
    const VERSION: u32 = encode_text::VERSION;
    const REQUIRED_UPSTREAM: &'static [&'static str] = &["encode_latents"];
    fn validate(&self) -> Result<(), ParamError> {
        EncodeTextParams::validate(self)
    }
    fn key_params(&self, settings: &PipelineSettings) -> serde_json::Value {
        EncodeTextParams::key_params(self, settings)
    }
    fn inputs(
        &self,
        settings: &PipelineSettings,
        hasher: &FileHasher,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        model_files(settings, hasher, EncodeTextParams::components())
    }
    fn uses_model(&self) -> bool {
        true
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        EncodeTextParams::run(self, ctx)
    }
}

impl StageKind for TrainParams {
    const KIND: &'static str = "train";
    const VERSION: u32 = train::VERSION;
    const REQUIRED_UPSTREAM: &'static [&'static str] = &["encode_latents"];
    fn validate(&self) -> Result<(), ParamError> {
        TrainParams::validate(self)
    }
    fn normalize(&mut self, _: &Path) -> Result<(), ParamError> {
        TrainParams::normalize(self);
        Ok(())
    }
    fn key_params(&self, settings: &PipelineSettings) -> serde_json::Value {
        TrainParams::key_params(self, settings)
    }
    fn inputs(
        &self,
        settings: &PipelineSettings,
        hasher: &FileHasher,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        model_files(settings, hasher, TrainParams::components())
    }
    fn uses_model(&self) -> bool {
        true
    }
    fn supports_half(&self) -> bool {
        TrainParams::supports_half(self)
    }
    fn describe(&self) -> String {
        format!(
            "train, method {}",
            serde_json::to_value(self.method)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        )
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        TrainParams::run(self, ctx)
    }
}

impl StageKind for SampleGridParams {
    const KIND: &'static str = "sample_grid";
    const VERSION: u32 = sample_grid::VERSION;
    fn validate(&self) -> Result<(), ParamError> {
        SampleGridParams::validate(self)
    }
    fn key_params(&self, settings: &PipelineSettings) -> serde_json::Value {
        SampleGridParams::key_params(self, settings)
    }
    fn inputs(
        &self,
        settings: &PipelineSettings,
        hasher: &FileHasher,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        model_files(settings, hasher, SampleGridParams::components())
    }
    fn uses_model(&self) -> bool {
        true
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        SampleGridParams::run(self, ctx)
    }
}

impl StageKind for ClassImagesParams {
    const KIND: &'static str = "class_images";
    const VERSION: u32 = class_images::VERSION;
    fn validate(&self) -> Result<(), ParamError> {
        ClassImagesParams::validate(self)
    }
    fn key_params(&self, settings: &PipelineSettings) -> serde_json::Value {
        ClassImagesParams::key_params(self, settings)
    }
    fn inputs(
        &self,
        settings: &PipelineSettings,
        hasher: &FileHasher,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        model_files(settings, hasher, ClassImagesParams::components())
    }
    fn uses_model(&self) -> bool {
        true
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        ClassImagesParams::run(self, ctx)
    }
}

impl StageKind for MergeParams {
    const KIND: &'static str = "merge";
    const VERSION: u32 = merge::VERSION;
    fn validate(&self) -> Result<(), ParamError> {
        MergeParams::validate(self)
    }
    fn normalize(&mut self, dir: &Path) -> Result<(), ParamError> {
        MergeParams::normalize(self, dir)
    }
    fn key_params(&self, settings: &PipelineSettings) -> serde_json::Value {
        MergeParams::key_params(self, settings)
    }
    fn inputs(
        &self,
        settings: &PipelineSettings,
        hasher: &FileHasher,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        MergeParams::inputs(self, settings, hasher)
    }
    fn uses_model(&self) -> bool {
        MergeParams::uses_model(self)
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        MergeParams::run(self, ctx)
    }
}

impl StageKind for PretrainParams {
    const KIND: &'static str = "pretrain";
    const VERSION: u32 = pretrain::VERSION;
    fn validate(&self) -> Result<(), ParamError> {
        PretrainParams::validate(self)
    }
    fn key_params(&self, _: &PipelineSettings) -> serde_json::Value {
        PretrainParams::key_params(self)
    }
    fn inputs(
        &self,
        settings: &PipelineSettings,
        hasher: &FileHasher,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        if self.init == Init::BaseModel {
            model_files(
                settings,
                hasher,
                &[Component::Unet, Component::Vae, Component::TextEncoder],
            )
        } else {
            Ok(BTreeMap::new())
        }
    }
    fn uses_model(&self) -> bool {
        self.init == Init::BaseModel
    }
    fn supports_half(&self) -> bool {
        // pretraining from scratch in f16 diverges; refused at `precision`
        false
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        PretrainParams::run(self, ctx)
    }
}

impl StageKind for ReportParams {
    const KIND: &'static str = "report";
    const VERSION: u32 = report::VERSION;
    const REQUIRED_UPSTREAM: &'static [&'static str] = &["sample_grid"];
    fn validate(&self) -> Result<(), ParamError> {
        ReportParams::validate(self)
    }
    fn key_params(&self, settings: &PipelineSettings) -> serde_json::Value {
        ReportParams::key_params(self, settings)
    }
    fn inputs(
        &self,
        _: &PipelineSettings,
        _: &FileHasher,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        Ok(BTreeMap::new())
    }
    fn uses_model(&self) -> bool {
        false
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        ReportParams::run(self, ctx)
    }
}
