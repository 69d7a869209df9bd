//! `encode_text`: the frozen text encoder's states of every caption of an `encode_latents`
//! stage, computed once and cached, so the train stages that read them (the variants of a
//! matrix, methods whose text encoder is frozen) do not each encode the same captions. A train
//! stage with it in `needs` takes its captions' states from it, bit for bit what it would
//! compute itself.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context as _, bail};
use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use super::ParamError;
use super::artifact::Artifact;
use super::context::{StageContext, StageResult};
use super::encode_latents::LatentsManifest;
use super::model::{Component, open_checkpoint};
use crate::diffusion::nn::Tensor3;
use crate::formats::{HostTensor, parse_safetensors, safetensors_bytes};
use crate::settings::PipelineSettings;

/// Implementation version (part of the key).
pub const VERSION: u32 = 1;

/// The output holding the states.
pub const STATES: &str = "text_states.safetensors";

/// Metadata key of the captions, a JSON array in tensor order (`states.<i>`).
const CAPTIONS_KEY: &str = "captions";
/// Metadata key of the clip skip the states were computed with.
const CLIP_SKIP_KEY: &str = "clip_skip";

/// `[stage.NAME] kind = "encode_text"`: reads `[pipeline] base_model`'s text encoder.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncodeTextParams {
    /// Text-encoder layers skipped from the end (diffusers' convention); the train stages
    /// that read the states must use the same.
    #[serde(default)]
    pub clip_skip: usize,
}

impl EncodeTextParams {
    pub(super) fn validate(&self) -> Result<(), ParamError> {
        if self.clip_skip > 11 {
            return Err(ParamError::new(
                "clip_skip",
                format!(
                    "clip_skip = {} skips more layers than CLIP has",
                    self.clip_skip
                ),
                "0 uses the last layer; 1 is A1111's \"Clip skip 2\"",
            ));
        }
        Ok(())
    }

    pub(super) fn key_params(&self, settings: &PipelineSettings) -> serde_json::Value {
        serde_json::json!({
            "clip_skip": self.clip_skip,
            // the states are computed where training runs, so they match what it would compute
            "device": crate::device::key_fragment(settings.device, settings.precision),
        })
    }

    pub(super) fn components() -> &'static [Component] {
        &[Component::TextEncoder]
    }

    pub(super) fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        let rt = crate::device::open(ctx.settings.device)?;
        crate::on_device!(rt, dev => self.run_on(ctx, dev))
    }

    fn run_on<D: Device<f32>>(
        &self,
        ctx: &StageContext<'_>,
        dev: D,
    ) -> anyhow::Result<StageResult> {
        let (_, lat_record) = ctx.upstream_of_kind("encode_latents")?;
        let manifest: LatentsManifest =
            ctx.read_json(lat_record, Artifact::Manifest.file_name())?;
        let captions: Vec<String> = manifest
            .items
            .iter()
            .map(|i| i.caption.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let ckpt = open_checkpoint(ctx.settings)?;
        let tokenizer = crate::diffusion::text_to_image::tokenizer_for(
            &ckpt,
            ctx.settings.model_config.as_deref(),
        )?;
        let encoder = ckpt.load_text_encoder(&dev)?;
        let bar = ctx.progress.bar(
            captions.len() as u64,
            &format!("{} encoding", ctx.instance.name),
        );
        let mut tensors = BTreeMap::new();
        for (i, caption) in captions.iter().enumerate() {
            ctx.check_cancelled()?;
            let ids = tokenizer.encode(caption)?.input_ids;
            let states = encoder.encode(&[ids], self.clip_skip)?;
            tensors.insert(format!("states.{i}"), HostTensor::from_tensor(&states));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let meta = HashMap::from([
            (CAPTIONS_KEY.to_string(), serde_json::to_string(&captions)?),
            (CLIP_SKIP_KEY.to_string(), self.clip_skip.to_string()),
        ]);
        let bytes = safetensors_bytes(std::path::Path::new(STATES), &tensors, Some(meta))?;
        let mut result = StageResult::default();
        result
            .outputs
            .insert(STATES.into(), ctx.store.put_bytes(&bytes)?);
        result.summary = format!(
            "{} captions encoded (clip skip {})",
            captions.len(),
            self.clip_skip
        );
        Ok(result)
    }
}

/// The text states of an upstream `encode_text` stage, by caption, on `dev`, when the train
/// stage has one in `needs`; `None` when it has none. States computed with another clip skip
/// than the train stage's `clip_skip` are an error naming both.
pub(super) fn cached_states<D: Device<f32>>(
    ctx: &StageContext<'_>,
    clip_skip: usize,
    dev: &D,
) -> anyhow::Result<Option<HashMap<String, Tensor3<D>>>> {
    let Some((instance, record)) = ctx
        .upstream
        .iter()
        .find(|(i, _)| i.params.kind() == "encode_text")
    else {
        return Ok(None);
    };
    let blob = record
        .outputs
        .get(STATES)
        .with_context(|| format!("stage `{}` has no {STATES}", instance.name))?;
    let file = parse_safetensors(std::path::Path::new(STATES), &ctx.store.read_blob(blob)?)?;
    let theirs: usize = file
        .metadata
        .get(CLIP_SKIP_KEY)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{STATES} of `{}` has no clip skip", instance.name))?;
    if theirs != clip_skip {
        bail!(
            "stage `{}` encoded the captions with clip_skip = {theirs} and this stage trains \
             with clip_skip = {clip_skip}: set the same value in both",
            instance.name
        );
    }
    let captions: Vec<String> = serde_json::from_str(
        file.metadata
            .get(CAPTIONS_KEY)
            .with_context(|| format!("{STATES} of `{}` lists no captions", instance.name))?,
    )?;
    let mut out = HashMap::new();
    for (i, caption) in captions.into_iter().enumerate() {
        let t = file
            .tensors
            .get(&format!("states.{i}"))
            .with_context(|| format!("{STATES}: no `states.{i}`"))?;
        let states = t
            .to_tensor::<(usize, usize, usize), D>(dev)
            .with_context(|| format!("{STATES}: `states.{i}` has shape {:?}", t.shape))?;
        out.insert(caption, states);
    }
    Ok(Some(out))
}
