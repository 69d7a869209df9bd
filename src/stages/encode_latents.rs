//! `encode_latents`: VAE-encodes every preprocessed item into its latent distribution (mean and
//! std), cached per item by the item's tensor, the VAE weights, device and precision, so adding
//! one image encodes one image.

use crate::stages::artifact::Artifact;
use std::collections::HashMap;

use anyhow::{Context as _, bail};
use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use super::ParamError;
use super::context::{StageContext, StageResult};
use super::model::{Component, open_checkpoint};
use super::preprocess::PreprocessManifest;
use crate::cache::store::ITEMS;
use crate::cache::{BlobRef, KEY_SCHEMA, Record, canonical_json, hash_bytes};

/// Implementation version (part of the key); bumped whenever the numbers change (v2: fused CPU kernels).
pub const VERSION: u32 = 2;

/// `[stage.NAME] kind = "encode_latents"`: reads `[pipeline] base_model`'s VAE.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncodeLatentsParams {
    /// Queries per attention chunk in the VAE's mid-block (memory bound; no effect on results).
    #[serde(default)]
    pub attention_chunk: Option<usize>,
}

/// One encoded item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentItem {
    /// Item name (from preprocess).
    pub name: String,
    /// Source image.
    pub source: String,
    /// Caption.
    pub caption: String,
    /// Whether it is a flipped copy.
    pub flipped: bool,
    /// Pixel size `[w, h]`.
    pub size: [u32; 2],
    /// Latent size `[w, h]`.
    pub latent_size: [u32; 2],
    /// safetensors with `mean` and `std`, f32 `[c, h, w]`, unscaled (multiply samples by the
    /// VAE's scaling factor for training).
    pub latents: BlobRef,
}

/// The `manifest.json` output of an encode_latents stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentsManifest {
    /// The VAE's scaling factor (0.18215 for SD 1.x).
    pub scaling_factor: f64,
    /// Latent channels.
    pub latent_channels: usize,
    /// Items in preprocess order.
    pub items: Vec<LatentItem>,
}

impl EncodeLatentsParams {
    pub(super) fn validate(&self) -> Result<(), ParamError> {
        if self.attention_chunk == Some(0) {
            return Err(ParamError::new(
                "attention_chunk",
                "attention_chunk must be positive",
                "e.g. 1024, or leave it out",
            ));
        }
        Ok(())
    }

    pub(super) fn key_params(
        &self,
        settings: &crate::settings::PipelineSettings,
    ) -> serde_json::Value {
        crate::device::key_fragment(settings.device, settings.precision)
    }

    pub(super) fn components() -> &'static [Component] {
        &[Component::Vae]
    }

    pub(super) fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        let rt = crate::device::open(ctx.settings.device)?;
        crate::on_device!(rt, dev => self.run_on(ctx, dev))
    }

    /// [`Self::run`] on the opened device.
    fn run_on<D: Device<f32>>(
        &self,
        ctx: &StageContext<'_>,
        dev: D,
    ) -> anyhow::Result<StageResult> {
        let (_, pre_record) = ctx.upstream_of_kind("preprocess")?;
        let manifest: PreprocessManifest =
            ctx.read_json(pre_record, Artifact::Manifest.file_name())?;
        let settings = &ctx.settings;
        let inputs = super::model::model_inputs(settings, ctx.hasher, Self::components())?;
        let vae_digest = hash_bytes(canonical_json(&serde_json::to_value(&inputs)?).as_bytes());
        let device_key = crate::device::key_fragment(settings.device, settings.precision);

        let item_key = |tensor: &BlobRef| {
            let material = serde_json::json!({
                "schema": KEY_SCHEMA,
                "kind": "encode_latents-item",
                "version": VERSION,
                "item": tensor.digest,
                "vae": vae_digest,
                "device": device_key,
            });
            hash_bytes(canonical_json(&material).as_bytes())
        };

        // Load the VAE only if some item is not cached.
        let mut cached: HashMap<String, Record> = HashMap::new();
        for item in &manifest.items {
            if let Some(r) = ctx.item_record(&item_key(&item.tensor))? {
                cached.insert(item.name.clone(), r);
            }
        }
        let missing = manifest.items.len() - cached.len();
        let vae = if missing > 0 {
            let ckpt = open_checkpoint(settings)?;
            let mut vae = ckpt.load_vae(&dev).context("loading the VAE")?;
            if let Some(chunk) = self.attention_chunk {
                vae.set_attention_chunk(chunk);
            }
            Some(vae)
        } else {
            None
        };

        let bar = ctx
            .progress
            .bar(missing as u64, &format!("{} encode", ctx.instance.name));
        let mut items = Vec::with_capacity(manifest.items.len());
        let (mut computed, mut latent_channels, mut scaling_factor) = (0usize, 0usize, 0.0f64);
        for item in &manifest.items {
            ctx.check_cancelled()?;
            let key = item_key(&item.tensor);
            let record = match cached.remove(&item.name) {
                Some(r) => {
                    ctx.store.touch(ITEMS, &key);
                    r
                }
                None => {
                    let vae = vae.as_ref().context("VAE not loaded")?;
                    let started = std::time::Instant::now();
                    let bytes = ctx.store.read_blob(&item.tensor)?;
                    let (data, shape) =
                        read_f32(&bytes, "image").with_context(|| format!("item {}", item.name))?;
                    let [c, h, w] = shape[..] else {
                        bail!(
                            "item {}: image tensor has shape {shape:?}, expected [3, h, w]",
                            item.name
                        );
                    };
                    let image = dev.tensor_from_vec(data, (1, c, h, w));
                    let post = vae
                        .encode(image)
                        .with_context(|| format!("encoding item {}", item.name))?;
                    let (_, z, lh, lw) = post.mean.shape().concrete().into();
                    let mean = post.mean.as_vec();
                    let std = post.std.as_vec();
                    if mean.iter().chain(&std).any(|v| !v.is_finite()) {
                        bail!("item {}: the VAE produced non-finite latents", item.name);
                    }
                    let file = write_latents(&mean, &std, [z, lh, lw], &item.name)?;
                    let blob = ctx.store.put_bytes(&file)?;
                    let stats = serde_json::json!({
                        "latent_shape": [z, lh, lw],
                        "scaling_factor": vae.config.scaling_factor,
                    });
                    let record = Record {
                        key: key.clone(),
                        kind: "encode_latents-item".into(),
                        stage: ctx.instance.name.clone(),
                        material: None,
                        outputs: [("latents".to_string(), blob)].into(),
                        stats,
                        summary: item.name.clone(),
                        created_unix: 0,
                        duration_s: started.elapsed().as_secs_f64(),
                        tool_version: env!("CARGO_PKG_VERSION").into(),
                    };
                    ctx.store.put_record(ITEMS, &key, &record)?;
                    computed += 1;
                    bar.inc(1);
                    record
                }
            };
            let shape: Vec<usize> =
                serde_json::from_value(record.stats["latent_shape"].clone()).unwrap_or_default();
            let [z, lh, lw] = shape[..] else {
                bail!("cached latents of item {} have no shape", item.name);
            };
            latent_channels = z;
            scaling_factor = record.stats["scaling_factor"].as_f64().unwrap_or(0.18215);
            items.push(LatentItem {
                name: item.name.clone(),
                source: item.source.clone(),
                caption: item.caption.clone(),
                flipped: item.flipped,
                size: item.size,
                latent_size: [lw as u32, lh as u32],
                latents: record
                    .outputs
                    .get("latents")
                    .cloned()
                    .context("latents record without output")?,
            });
        }
        bar.finish_and_clear();

        let manifest = LatentsManifest {
            scaling_factor,
            latent_channels,
            items,
        };
        let mut result = StageResult::default();
        for item in &manifest.items {
            result.outputs.insert(
                // The dataset's folders are kept: `a/x.png` and `a__x.png` are two files.
                format!("latents/{}.safetensors", item.name),
                item.latents.clone(),
            );
        }
        result.outputs.insert(
            Artifact::Manifest.file_name().into(),
            ctx.store
                .put_bytes(&serde_json::to_vec_pretty(&manifest)?)?,
        );
        result
            .stats
            .insert("items".into(), manifest.items.len().into());
        result
            .stats
            .insert("items_computed".into(), computed.into());
        result.stats.insert(
            "items_reused".into(),
            (manifest.items.len() - computed).into(),
        );
        result.summary = format!(
            "{} latents ({computed} encoded, {} reused)",
            manifest.items.len(),
            manifest.items.len() - computed
        );
        Ok(result)
    }
}

/// Reads f32 tensor `name` of a safetensors file: (data, shape).
pub(crate) fn read_f32(bytes: &[u8], name: &str) -> anyhow::Result<(Vec<f32>, Vec<usize>)> {
    let st = safetensors::SafeTensors::deserialize(bytes).context("not a safetensors file")?;
    let view = st
        .tensor(name)
        .with_context(|| format!("no tensor `{name}`"))?;
    if view.dtype() != safetensors::Dtype::F32 {
        bail!("tensor `{name}` is {:?}, expected F32", view.dtype());
    }
    let data = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((data, view.shape().to_vec()))
}

fn write_latents(
    mean: &[f32],
    std: &[f32],
    shape: [usize; 3],
    name: &str,
) -> anyhow::Result<Vec<u8>> {
    let mb: Vec<u8> = mean.iter().flat_map(|v| v.to_le_bytes()).collect();
    let sb: Vec<u8> = std.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = [
        (
            "mean",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), &mb)?,
        ),
        (
            "std",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), &sb)?,
        ),
    ];
    let meta = HashMap::from([(
        "sdpipe".to_string(),
        serde_json::json!({ "item": name }).to_string(),
    )]);
    Ok(safetensors::tensor::serialize(views, Some(meta))?)
}
