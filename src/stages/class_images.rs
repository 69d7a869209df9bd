//! `class_images`: DreamBooth's prior-preservation set. Generates `count` images of the class
//! prompt (e.g. "a photo of a dog") with the base model, one seed per image, and hands a
//! `train` stage their latents in the shape of an `encode_latents` manifest.
//!
//! The latents are the sampler's final latents (divided by the VAE scaling factor, like
//! encoded images), so no encode pass is needed; the PNGs are written for people to look at.
//! Every image is cached on its own: raising `count` from 50 to 100 samples only the 50 new
//! ones, and the set is reused by every train stage (and pipeline) with the same settings.

use crate::stages::artifact::Artifact;
use anyhow::{Context as _, bail};
use dfdx::prelude::*;

use crate::diffusion::nn::Elem;
use serde::{Deserialize, Serialize};

use super::ParamError;
use super::context::{StageContext, StageResult};
use super::encode_latents::{LatentItem, LatentsManifest};
use super::model::{Component, model_inputs, open_checkpoint};
use crate::cache::store::ITEMS;
use crate::cache::{KEY_SCHEMA, Record, canonical_json, hash_bytes};
use crate::diffusion::schedulers::SamplerKind;
use crate::diffusion::text_to_image::{TextToImage, TextToImageOptions};
use crate::formats::{HostTensor, safetensors_bytes};
use crate::render::png_meta::{GenerationParameters, encode_png};
use crate::render::rgb_image_from_chw;
use crate::settings::PipelineSettings;

/// Implementation version (part of the key).
pub const VERSION: u32 = 1;

/// `[stage.NAME] kind = "class_images"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassImagesParams {
    /// The class prompt, e.g. `"a photo of a dog"` (diffusers' `class_prompt`).
    pub prompt: String,
    /// Negative prompt.
    #[serde(default)]
    pub negative_prompt: String,
    /// Number of class images (diffusers' `num_class_images`, default 100).
    #[serde(default = "default_count")]
    pub count: usize,
    /// Sampling steps.
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// `"ddim"`, `"euler"` or `"euler_a"`.
    #[serde(default = "default_sampler")]
    pub sampler: SamplerKind,
    /// Classifier-free guidance scale.
    #[serde(default = "default_cfg")]
    pub cfg: f32,
    /// Image width (default: the model's native size); use the training resolution.
    #[serde(default)]
    pub width: Option<usize>,
    /// Image height (default: the model's native size).
    #[serde(default)]
    pub height: Option<usize>,
    /// Text-encoder layers skipped from the end.
    #[serde(default)]
    pub clip_skip: usize,
}

fn default_count() -> usize {
    100
}
fn default_steps() -> usize {
    30
}
fn default_sampler() -> SamplerKind {
    SamplerKind::Ddim
}
fn default_cfg() -> f32 {
    7.5
}

impl ClassImagesParams {
    pub(super) fn validate(&self) -> Result<(), ParamError> {
        if self.prompt.trim().is_empty() {
            return Err(ParamError::new(
                "prompt",
                "the class prompt is empty",
                "describe the class, e.g. prompt = \"a photo of a dog\"",
            ));
        }
        if self.count == 0 {
            return Err(ParamError::new(
                "count",
                "count must be positive",
                "diffusers uses 100 class images; 20-200 are common",
            ));
        }
        if self.steps == 0 {
            return Err(ParamError::new(
                "steps",
                "steps must be positive",
                "e.g. steps = 30",
            ));
        }
        super::checks::non_negative(
            "cfg",
            f64::from(self.cfg),
            "7.5 is the usual value; 1 or less disables guidance",
        )?;
        for (field, v) in [("width", self.width), ("height", self.height)] {
            if let Some(v) = v
                && (v == 0 || !v.is_multiple_of(8))
            {
                return Err(ParamError::new(
                    field,
                    format!("{field} {v} is not a positive multiple of 8"),
                    "use the training resolution, e.g. 512",
                ));
            }
        }
        Ok(())
    }

    pub(super) fn key_params(&self, settings: &PipelineSettings) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = v.as_object_mut() {
            map.insert("seed".into(), settings.seed.into());
            map.insert(
                "device".into(),
                crate::device::key_fragment(settings.device, settings.precision),
            );
        }
        v
    }

    pub(super) fn components() -> &'static [Component] {
        &[Component::Unet, Component::Vae, Component::TextEncoder]
    }

    /// The seed of image `i`.
    fn seed_of(settings: &PipelineSettings, i: usize) -> u64 {
        settings.seed.wrapping_add(i as u64)
    }

    pub(super) fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        let rt = crate::device::open(ctx.settings.device)?;
        crate::on_device_precision!(rt, ctx.settings.precision, dev, E => self.run_on::<E, _>(ctx, dev))
    }

    /// [`Self::run`] on the opened device.
    fn run_on<E: Elem, D: Device<f32> + Device<E>>(
        &self,
        ctx: &StageContext<'_>,
        dev: D,
    ) -> anyhow::Result<StageResult> {
        let settings = &ctx.settings;
        let model_path = settings
            .base_model
            .clone()
            .context("[pipeline] has no base_model")?;
        let inputs = model_inputs(settings, ctx.hasher, Self::components())?;
        let model_digest = hash_bytes(canonical_json(&serde_json::to_value(&inputs)?).as_bytes());
        let device_key = crate::device::key_fragment(settings.device, settings.precision);
        let item_key = |seed: u64| {
            let material = serde_json::json!({
                "schema": KEY_SCHEMA,
                "kind": "class_images-image",
                "version": VERSION,
                "model": model_digest,
                "prompt": self.prompt,
                "negative": self.negative_prompt,
                "seed": seed,
                "steps": self.steps,
                "sampler": self.sampler,
                "cfg": self.cfg,
                "width": self.width,
                "height": self.height,
                "clip_skip": self.clip_skip,
                "device": device_key,
            });
            hash_bytes(canonical_json(&material).as_bytes())
        };

        let mut records = Vec::with_capacity(self.count);
        let mut todo = 0usize;
        for i in 0..self.count {
            let r = ctx.item_record(&item_key(Self::seed_of(settings, i)))?;
            todo += usize::from(r.is_none());
            records.push(r);
        }

        let mut t2i: Option<TextToImage<D, E>> = None;
        let bar = ctx.progress.bar(
            (todo * self.steps) as u64,
            &format!("{} class images", ctx.instance.name),
        );
        // hashing the model file is only worth it when something is sampled
        let model_hash = if todo > 0 {
            crate::sample::short_model_hash(&model_path).ok()
        } else {
            None
        };
        let mut computed = 0usize;
        for (i, slot) in records.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            ctx.check_cancelled()?;
            // Another run may be sampling this image: wait for it and use its result.
            let key = item_key(Self::seed_of(settings, i));
            let _item_lock = ctx.item_lock(&key)?;
            if let Some(r) = ctx.item_record(&key)? {
                bar.inc(self.steps as u64);
                *slot = Some(r);
                continue;
            }
            if t2i.is_none() {
                let ckpt = open_checkpoint(settings)?;
                t2i = Some(
                    TextToImage::load_as(&ckpt, settings.model_config.as_deref(), &dev)
                        .with_context(|| format!("loading {}", model_path.display()))?,
                );
            }
            let Some(pipe) = t2i.as_ref() else {
                bail!("model not loaded")
            };
            let started = std::time::Instant::now();
            let seed = Self::seed_of(settings, i);
            let options = TextToImageOptions {
                prompt: self.prompt.clone(),
                negative_prompt: self.negative_prompt.clone(),
                width: self.width,
                height: self.height,
                steps: self.steps,
                sampler: self.sampler,
                cfg_scale: self.cfg,
                batch: 1,
                seed,
                clip_skip: self.clip_skip,
            };
            let generation = pipe
                .generate(&options, None, &mut |_| bar.inc(1))
                .with_context(|| format!("sampling class image {i} (seed {seed})"))?;
            let (_, _, h, w) = *generation.images.shape();
            let chw = generation.image_chw(0).context("no image generated")?;
            let image = rgb_image_from_chw(&chw, h as u32, w as u32)?;
            let params = GenerationParameters {
                prompt: self.prompt.clone(),
                negative_prompt: self.negative_prompt.clone(),
                steps: self.steps as u32,
                sampler: self.sampler.a1111_name().to_string(),
                cfg_scale: self.cfg,
                seed,
                width: w as u32,
                height: h as u32,
                model_hash: model_hash.clone(),
                model: model_path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned()),
                extra: Vec::new(),
            };
            let png = encode_png(&image, &[("parameters", params.to_infotext().as_str())])?;

            // The latents as encode_latents stores them: unscaled mean, zero std.
            let (_, c, lh, lw) = *generation.latents.shape();
            let scaling = pipe.models.vae.config.scaling_factor as f32;
            let mean: Vec<f32> = generation
                .latents
                .as_vec()
                .into_iter()
                .map(|v| v / scaling)
                .collect();
            let shape = vec![c, lh, lw];
            let tensors: std::collections::BTreeMap<String, HostTensor> = [
                (
                    "mean".to_string(),
                    HostTensor::new(shape.clone(), mean).context("latent shape")?,
                ),
                ("std".to_string(), HostTensor::zeros(shape)),
            ]
            .into_iter()
            .collect();
            let latents = safetensors_bytes(std::path::Path::new("latents"), &tensors, None)?;

            let key = item_key(seed);
            let r = Record {
                key: key.clone(),
                kind: "class_images-image".into(),
                stage: ctx.instance.name.clone(),
                material: None,
                outputs: [
                    ("image".to_string(), ctx.store.put_bytes(&png)?),
                    ("latents".to_string(), ctx.store.put_bytes(&latents)?),
                ]
                .into(),
                stats: serde_json::json!({
                    "width": w, "height": h, "latent_channels": c,
                    "latent_width": lw, "latent_height": lh, "scaling_factor": scaling,
                }),
                summary: format!("{} / seed {seed}", self.prompt),
                created_unix: 0,
                duration_s: started.elapsed().as_secs_f64(),
                tool_version: env!("CARGO_PKG_VERSION").into(),
            };
            ctx.store.put_record(ITEMS, &key, &r)?;
            computed += 1;
            *slot = Some(r);
        }
        bar.finish_and_clear();

        let mut result = StageResult::default();
        let mut items = Vec::with_capacity(self.count);
        let mut scaling_factor = 0.0;
        let mut latent_channels = 0;
        for (i, record) in records.iter().enumerate() {
            let record = record.as_ref().context("a class image is missing")?;
            let get = |name: &str| {
                record
                    .outputs
                    .get(name)
                    .cloned()
                    .with_context(|| format!("class image record without {name}"))
            };
            let stat = |name: &str| {
                record
                    .stats
                    .get(name)
                    .and_then(|v| v.as_f64())
                    .unwrap_or(0.0)
            };
            scaling_factor = stat("scaling_factor");
            latent_channels = stat("latent_channels") as usize;
            let name = format!("class-{i:04}");
            let image = get("image")?;
            result
                .outputs
                .insert(format!("images/{name}.png"), image.clone());
            items.push(LatentItem {
                name: name.clone(),
                source: format!("images/{name}.png"),
                caption: self.prompt.clone(),
                flipped: false,
                size: [stat("width") as u32, stat("height") as u32],
                latent_size: [stat("latent_width") as u32, stat("latent_height") as u32],
                latents: get("latents")?,
            });
        }
        let manifest = LatentsManifest {
            scaling_factor,
            latent_channels,
            items,
        };
        result.outputs.insert(
            Artifact::Manifest.file_name().into(),
            ctx.store
                .put_bytes(&serde_json::to_vec_pretty(&manifest)?)?,
        );
        result.stats.insert("images".into(), self.count.into());
        result
            .stats
            .insert("images_computed".into(), computed.into());
        result.summary = format!(
            "{} class images of {:?} ({computed} sampled, {} reused)",
            self.count,
            self.prompt,
            self.count - computed
        );
        Ok(result)
    }
}
