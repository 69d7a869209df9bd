//! `sample_grid`: text-to-image for every variant × prompt × seed with identical sampler
//! settings, always with the untouched base model as the first row; a labelled grid PNG plus
//! one PNG per image carrying A1111's `parameters` text. Images are cached one by one, so adding
//! a seed or a prompt renders only the new cells.
//!
//! Rows: `base`, then one per upstream `train` stage (its LoRA at multiplier 1, its embedding,
//! or its hypernetwork at multiplier 1).
//!
//! Prompts accept A1111's extra-network tags, applied on top of every row:
//! `<lora:NAME:WEIGHT>` merges the LoRA of the upstream train stage instance `NAME` at WEIGHT,
//! `<hypernet:NAME:MULTIPLIER>` stacks its hypernetwork at MULTIPLIER (after the row's own);
//! the number may be left out (1). The tags are removed from the text the model sees and kept
//! in the images' `parameters`, as A1111 does. `NAME` must be a stage in `needs`.

use crate::stages::artifact::Artifact;
use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use dfdx::prelude::*;

use crate::diffusion::nn::Elem;
use serde::{Deserialize, Serialize};

use super::ParamError;
use super::context::{StageContext, StageResult};
use super::model::{Component, model_inputs, open_checkpoint};
use crate::cache::store::ITEMS;
use crate::cache::{BlobRef, KEY_SCHEMA, Record, canonical_json, hash_bytes};
use crate::diffusion::schedulers::SamplerKind;
use crate::diffusion::text_to_image::{TextToImage, TextToImageOptions};
use crate::render::grid::{GridStyle, SampleGrid};
use crate::render::png_meta::{GenerationParameters, encode_png, read_png_text_bytes};
use crate::render::rgb_image_from_chw;
use crate::settings::PipelineSettings;

/// Implementation version (part of the key); bumped whenever the numbers change (v2: fused CPU kernels).
pub const VERSION: u32 = 2;

/// `[stage.NAME] kind = "sample_grid"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleGridParams {
    /// Prompts, one grid column group each.
    pub prompts: Vec<String>,
    /// Negative prompt shared by every image.
    #[serde(default)]
    pub negative_prompt: String,
    /// Seeds, one column per prompt and seed. Default (key absent): the pipeline seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seeds: Option<Vec<u64>>,
    /// Sampling steps.
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// `"ddim"`, `"euler"` or `"euler_a"`.
    #[serde(default = "default_sampler")]
    pub sampler: SamplerKind,
    /// Classifier-free guidance scale.
    #[serde(default = "default_cfg")]
    pub cfg: f32,
    /// Image width (default: the model's native size).
    #[serde(default)]
    pub width: Option<usize>,
    /// Image height (default: the model's native size).
    #[serde(default)]
    pub height: Option<usize>,
    /// Text-encoder layers skipped from the end (diffusers' convention: 1 = A1111's "Clip skip: 2").
    #[serde(default)]
    pub clip_skip: usize,
}

fn default_steps() -> usize {
    20
}
fn default_sampler() -> SamplerKind {
    SamplerKind::EulerAncestral
}
fn default_cfg() -> f32 {
    7.5
}

/// One cell of the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridCell {
    /// Row (variant) name.
    pub variant: String,
    /// Index into the prompts.
    pub prompt_index: usize,
    /// The prompt.
    pub prompt: String,
    /// The seed.
    pub seed: u64,
    /// The PNG (with its `parameters` text).
    pub image: BlobRef,
}

/// The `manifest.json` output of a sample_grid stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridManifest {
    /// Row names, top to bottom (`base` first).
    pub variants: Vec<String>,
    /// Column labels, left to right.
    pub columns: Vec<String>,
    /// Every image.
    pub cells: Vec<GridCell>,
    /// The grid.
    pub grid: BlobRef,
}

impl SampleGridParams {
    pub(super) fn validate(&self) -> Result<(), ParamError> {
        if self.prompts.is_empty() {
            return Err(ParamError::new(
                "prompts",
                "`prompts` is empty",
                "give at least one prompt, e.g. prompts = [\"a photo of sks dog\"]",
            ));
        }
        if self.steps == 0 || self.steps > 1000 {
            return Err(ParamError::new(
                "steps",
                format!("steps = {} is out of range", self.steps),
                "use 1..=1000 (20-50 is typical)",
            ));
        }
        for prompt in &self.prompts {
            if let Err(e) = parse_network_tags(prompt) {
                return Err(ParamError::new(
                    "prompts",
                    format!("prompt {prompt:?}: {e}"),
                    "write <lora:NAME:WEIGHT> or <hypernet:NAME:MULTIPLIER> with NAME a train stage in needs",
                ));
            }
        }
        if self.seeds.as_ref().is_some_and(Vec::is_empty) {
            return Err(ParamError::new(
                "seeds",
                "`seeds` is empty: the grid would have no columns",
                "give at least one seed, e.g. seeds = [1, 2, 3, 4], or leave the key out to use \
                 the pipeline seed",
            ));
        }
        if !(self.cfg.is_finite() && self.cfg >= 0.0) {
            return Err(ParamError::new(
                "cfg",
                "cfg must be a non-negative number",
                "7.5 is the usual value; 1 or less disables guidance",
            ));
        }
        for (field, v) in [("width", self.width), ("height", self.height)] {
            if let Some(v) = v
                && (v == 0 || !v.is_multiple_of(8))
            {
                return Err(ParamError::new(
                    field,
                    format!("{field} = {v} is not a positive multiple of 8"),
                    "SD sizes are multiples of 8, e.g. 512",
                ));
            }
        }
        Ok(())
    }

    /// The seeds used: `seeds`, or the pipeline seed.
    fn seeds(&self, settings: &PipelineSettings) -> Vec<u64> {
        self.seeds.clone().unwrap_or_else(|| vec![settings.seed])
    }

    pub(super) fn key_params(&self, settings: &PipelineSettings) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = v.as_object_mut() {
            map.insert(
                "seeds".into(),
                serde_json::to_value(self.seeds(settings)).unwrap_or_default(),
            );
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
        let seeds = self.seeds(settings);
        let model_path = settings
            .base_model
            .clone()
            .context("[pipeline] has no base_model")?;
        let inputs = model_inputs(settings, ctx.hasher, Self::components())?;
        let model_digest = hash_bytes(canonical_json(&serde_json::to_value(&inputs)?).as_bytes());
        let device_key = crate::device::key_fragment(settings.device, settings.precision);
        // The rows: the base model, then for every upstream training result (a LoRA applied
        // at multiplier 1, an embedding for its token, a hypernetwork, or a whole checkpoint
        // that replaces the base model) its saved steps (`NAME#step=N`, `save_every`), its
        // final artifact (named after its stage instance) and its EMA (`NAME#ema`). Each
        // row's files by kind, in `Artifact::TRAINED` order, and the scheduler config a
        // variant trained with another parameterisation or schedule is sampled with.
        type Row = (String, [Option<BlobRef>; 4], Option<BlobRef>);
        let mut rows: Vec<Row> = vec![("base".to_string(), Default::default(), None)];
        for (instance, record) in &ctx.upstream {
            let scheduler = Artifact::SchedulerConfig.in_record(record).cloned();
            let only = |kind: Artifact, blob: &BlobRef| {
                Artifact::TRAINED.map(|k| (k == kind).then(|| blob.clone()))
            };
            for kind in Artifact::TRAINED {
                for (step, blob) in kind.snapshots(record) {
                    let name = format!("{}#step={step}", instance.name);
                    rows.push((name, only(kind, blob), scheduler.clone()));
                }
            }
            let last = Artifact::TRAINED.map(|k| k.in_record(record).cloned());
            if last.iter().any(Option::is_some) {
                rows.push((instance.name.clone(), last, scheduler.clone()));
            }
            for kind in Artifact::TRAINED {
                if let Some(blob) = kind.ema(record) {
                    let name = format!("{}#ema", instance.name);
                    rows.push((name, only(kind, blob), scheduler.clone()));
                }
            }
        }
        let variants: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        let files =
            |i: usize| -> Vec<Option<BlobRef>> { rows.iter().map(|r| r.1[i].clone()).collect() };
        let (loras, embeddings, hypernets, checkpoints) = (files(0), files(1), files(2), files(3));
        let schedulers: Vec<Option<BlobRef>> = rows.iter().map(|r| r.2.clone()).collect();
        // Each prompt: the text the model sees, and its tags resolved to upstream files.
        let mut prompt_networks: Vec<(String, Vec<(NetworkTag, BlobRef)>)> = Vec::new();
        for prompt in &self.prompts {
            let (text, tags) = parse_network_tags(prompt).map_err(anyhow::Error::msg)?;
            let mut resolved = Vec::new();
            for tag in tags {
                let output = match tag.kind {
                    NetworkKind::Lora => Artifact::Lora,
                    NetworkKind::Hypernet => Artifact::Hypernetwork,
                }
                .file_name();
                let found = ctx
                    .upstream
                    .iter()
                    .find(|(i, _)| i.name == tag.name)
                    .and_then(|(_, r)| r.outputs.get(output));
                let Some(blob) = found else {
                    let names: Vec<&str> = ctx
                        .upstream
                        .iter()
                        .filter(|(_, r)| r.outputs.contains_key(output))
                        .map(|(i, _)| i.name.as_str())
                        .collect();
                    bail!(
                        "prompt {prompt:?}: `{}` is not an upstream stage with a {output} (stages in needs that have one: {names:?})",
                        tag.name
                    );
                };
                resolved.push((tag, blob.clone()));
            }
            prompt_networks.push((text, resolved));
        }

        let variant_digest = |vi: usize| {
            loras[vi]
                .as_ref()
                .or(embeddings[vi].as_ref())
                .or(hypernets[vi].as_ref())
                .or(checkpoints[vi].as_ref())
                .map_or("base".to_string(), |b| b.digest.clone())
        };
        let cell_key = |vi: usize, pi: usize, seed: u64| {
            let prompt = &self.prompts[pi];
            let mut material = serde_json::json!({
                "schema": KEY_SCHEMA,
                "kind": "sample_grid-image",
                "version": VERSION,
                "model": model_digest,
                "variant": variant_digest(vi),
                "prompt": prompt,
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
            if let Some(scheduler) = &schedulers[vi] {
                material["scheduler"] = scheduler.digest.clone().into();
            }
            let tags = &prompt_networks[pi].1;
            if !tags.is_empty() {
                material["networks"] = tags
                    .iter()
                    .map(|(t, b)| serde_json::json!([t.kind.tag(), b.digest, t.weight]))
                    .collect();
            }
            hash_bytes(canonical_json(&material).as_bytes())
        };

        let mut todo = 0usize;
        let mut cells: BTreeMap<(usize, usize, usize), Option<Record>> = BTreeMap::new();
        for vi in 0..variants.len() {
            for pi in 0..self.prompts.len() {
                for (si, seed) in seeds.iter().enumerate() {
                    let r = ctx.item_record(&cell_key(vi, pi, *seed))?;
                    todo += usize::from(r.is_none());
                    cells.insert((vi, pi, si), r);
                }
            }
        }

        let mut pipe = None;
        let model_hash = if todo > 0 {
            crate::sample::short_model_hash(&model_path).ok()
        } else {
            None
        };
        // A1111's short hash of each row checkpoint, for the infotext
        let checkpoint_hashes: Vec<Option<String>> = checkpoints
            .iter()
            .map(|c| {
                c.as_ref().filter(|_| todo > 0).and_then(|b| {
                    crate::sample::short_model_hash(&ctx.store.blob_path(&b.digest)).ok()
                })
            })
            .collect();
        let model_name = model_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned());
        let bar = ctx.progress.bar(
            (todo * self.steps) as u64,
            &format!("{} sampling", ctx.instance.name),
        );
        let mut computed = 0usize;
        let mut current: Option<((usize, usize), TextToImage<D, E>)> = None;
        for ((vi, pi, si), record) in cells.iter_mut() {
            if record.is_some() {
                continue;
            }
            ctx.check_cancelled()?;
            // Another run may be sampling this cell (an overlapping grid): wait for it and use
            // its image rather than sampling it twice.
            let _cell_lock = ctx.item_lock(&cell_key(*vi, *pi, seeds[*si]))?;
            if let Some(r) = ctx.item_record(&cell_key(*vi, *pi, seeds[*si]))? {
                bar.inc(self.steps as u64);
                *record = Some(r);
                continue;
            }
            if pipe.is_none() {
                let ckpt = open_checkpoint(settings)?;
                pipe = Some(
                    TextToImage::load_as(&ckpt, settings.model_config.as_deref(), &dev)
                        .with_context(|| format!("loading {}", model_path.display()))?,
                );
            }
            let Some(base) = pipe.as_ref() else {
                bail!("model not loaded")
            };
            // Prompts with the same tags share the model of a row.
            let same_tags = |a: usize, b: usize| {
                let (ta, tb) = (&prompt_networks[a].1, &prompt_networks[b].1);
                ta.len() == tb.len()
                    && ta
                        .iter()
                        .zip(tb)
                        .all(|((x, xb), (y, yb))| x == y && xb.digest == yb.digest)
            };
            if current
                .as_ref()
                .is_none_or(|((v, p), _)| v != vi || !same_tags(*p, *pi))
            {
                // Each variant starts from the untouched base model, or its own checkpoint.
                let mut t2i = match &checkpoints[*vi] {
                    Some(blob) => {
                        let ckpt = super::merge::open_model_blob(ctx, blob)?;
                        let config_dir = super::merge::config_dir(settings);
                        TextToImage::load_as(&ckpt, config_dir.as_deref(), &dev)
                            .with_context(|| format!("loading the model of {}", variants[*vi]))?
                    }
                    None => base.clone(),
                };
                if let Some(blob) = &schedulers[*vi] {
                    t2i.scheduler_config = serde_json::from_slice(&ctx.store.read_blob(blob)?)
                        .with_context(|| {
                            format!("reading the scheduler config of {}", variants[*vi])
                        })?;
                }
                if let Some(blob) = &loras[*vi] {
                    let tmp = tempfile::Builder::new().suffix(".safetensors").tempfile()?;
                    std::fs::write(tmp.path(), ctx.store.read_blob(blob)?)?;
                    let (network, _) = crate::formats::lora::read_lora(tmp.path(), None)
                        .with_context(|| format!("reading the LoRA of {}", variants[*vi]))?;
                    crate::train::lora::install(&mut t2i.models.unet, &network, 1.0, &dev)?;
                    crate::train::lora::install(
                        t2i.models.text_encoder_mut(),
                        &network,
                        1.0,
                        &dev,
                    )?;
                }
                if let Some(blob) = &embeddings[*vi] {
                    let tmp = tempfile::Builder::new().suffix(".safetensors").tempfile()?;
                    std::fs::write(tmp.path(), ctx.store.read_blob(blob)?)?;
                    // The token is in the file's `name` metadata (the blob's temp name means nothing).
                    let token = crate::formats::read_safetensors(tmp.path())
                        .ok()
                        .and_then(|f| f.metadata.get("name").cloned());
                    let (emb, _) =
                        crate::formats::embedding::read_embedding(tmp.path(), token.as_deref())
                            .with_context(|| {
                                format!("reading the embedding of {}", variants[*vi])
                            })?;
                    t2i.add_embedding(&emb.token, &emb.vectors.data)
                        .with_context(|| format!("adding the embedding of {}", variants[*vi]))?;
                }
                // The hypernetworks: the row's at 1, then the prompt's tags in order.
                let mut stack = Vec::new();
                if let Some(blob) = &hypernets[*vi] {
                    stack.push((read_hypernet(ctx, blob, &variants[*vi], &dev)?, 1.0));
                }
                for (tag, blob) in &prompt_networks[*pi].1 {
                    match tag.kind {
                        NetworkKind::Lora => {
                            let tmp = tempfile::Builder::new().suffix(".safetensors").tempfile()?;
                            std::fs::write(tmp.path(), ctx.store.read_blob(blob)?)?;
                            let (network, _) = crate::formats::lora::read_lora(tmp.path(), None)
                                .with_context(|| format!("reading the LoRA of {}", tag.name))?;
                            crate::train::lora::merge_into_unet(
                                &mut t2i.models.unet,
                                &network,
                                tag.weight,
                            )?;
                            crate::train::lora::merge_into_unet(
                                t2i.models.text_encoder_mut(),
                                &network,
                                tag.weight,
                            )?;
                        }
                        NetworkKind::Hypernet => {
                            stack.push((read_hypernet(ctx, blob, &tag.name, &dev)?, tag.weight));
                        }
                    }
                }
                if !stack.is_empty() {
                    let refs: Vec<_> = stack.iter().map(|(n, m)| (n, *m)).collect();
                    crate::train::hypernetwork::install(&mut t2i.models.unet, &refs, None)?;
                }
                current = Some(((*vi, *pi), t2i));
            }
            let Some((_, t2i)) = current.as_ref() else {
                bail!("variant not loaded")
            };
            let started = std::time::Instant::now();
            let (prompt, seed) = (&self.prompts[*pi], seeds[*si]);
            let options = TextToImageOptions {
                prompt: prompt_networks[*pi].0.clone(),
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
            let generation = t2i
                .generate(&options, None, &mut |_| bar.inc(1))
                .with_context(|| format!("sampling {prompt:?} seed {seed}"))?;
            let (_, _, h, w) = *generation.images.shape();
            let chw = generation.image_chw(0).context("no image generated")?;
            let image = rgb_image_from_chw(&chw, h as u32, w as u32)?;
            let params = GenerationParameters {
                prompt: prompt.clone(),
                negative_prompt: self.negative_prompt.clone(),
                steps: self.steps as u32,
                sampler: self.sampler.a1111_name().to_string(),
                cfg_scale: self.cfg,
                seed,
                width: w as u32,
                height: h as u32,
                model_hash: match &checkpoints[*vi] {
                    Some(_) => checkpoint_hashes[*vi].clone(),
                    None => model_hash.clone(),
                },
                model: match &checkpoints[*vi] {
                    Some(_) => Some(variants[*vi].clone()),
                    None => model_name.clone(),
                },
                extra: {
                    let mut extra = Vec::new();
                    if self.clip_skip > 0 {
                        extra.push(("Clip skip".into(), (self.clip_skip + 1).to_string()));
                    }
                    let tags = &prompt_networks[*pi].1;
                    let mut lora_hashes: Vec<String> = Vec::new();
                    let mut hypernet_hashes: Vec<String> = Vec::new();
                    if let Some(blob) = &loras[*vi] {
                        lora_hashes.push(format!("{}: {}", variants[*vi], &blob.digest[..12]));
                    }
                    if let Some(blob) = &hypernets[*vi] {
                        hypernet_hashes.push(format!("{}: {}", variants[*vi], &blob.digest[..12]));
                    }
                    for (tag, blob) in tags {
                        let entry = format!("{}: {}", tag.name, &blob.digest[..12]);
                        match tag.kind {
                            NetworkKind::Lora => lora_hashes.push(entry),
                            NetworkKind::Hypernet => hypernet_hashes.push(entry),
                        }
                    }
                    if !lora_hashes.is_empty() {
                        extra.push((
                            "Lora hashes".into(),
                            format!("\"{}\"", lora_hashes.join(", ")),
                        ));
                    }
                    if !hypernet_hashes.is_empty() {
                        extra.push((
                            "Hypernet hashes".into(),
                            format!("\"{}\"", hypernet_hashes.join(", ")),
                        ));
                    }
                    extra
                },
            };
            let infotext = params.to_infotext();
            let png = encode_png(&image, &[("parameters", infotext.as_str())])?;
            let blob = ctx.store.put_bytes(&png)?;
            let variant = &variants[*vi];
            let key = cell_key(*vi, *pi, seed);
            let r = Record {
                key: key.clone(),
                kind: "sample_grid-image".into(),
                stage: ctx.instance.name.clone(),
                material: None,
                outputs: [("image".to_string(), blob)].into(),
                stats: serde_json::json!({ "width": w, "height": h }),
                summary: format!("{variant} / {prompt} / seed {seed}"),
                created_unix: 0,
                duration_s: started.elapsed().as_secs_f64(),
                tool_version: env!("CARGO_PKG_VERSION").into(),
            };
            ctx.store.put_record(ITEMS, &key, &r)?;
            computed += 1;
            *record = Some(r);
        }
        bar.finish_and_clear();

        // Assemble the grid from the cached cells.
        let columns: Vec<String> = self
            .prompts
            .iter()
            .flat_map(|p| seeds.iter().map(move |s| format!("{p} · seed {s}")))
            .collect();
        let mut grid = SampleGrid::new(columns.clone());
        let mut manifest_cells = Vec::new();
        let mut result = StageResult::default();
        for (vi, variant) in variants.iter().enumerate() {
            let mut row = Vec::new();
            for (pi, prompt) in self.prompts.iter().enumerate() {
                for (si, seed) in seeds.iter().enumerate() {
                    let record = cells
                        .get(&(vi, pi, si))
                        .and_then(Option::as_ref)
                        .context("a grid cell is missing")?;
                    let blob = record
                        .outputs
                        .get("image")
                        .context("image record without image")?
                        .clone();
                    let bytes = ctx.store.read_blob(&blob)?;
                    if read_png_text_bytes(&bytes)
                        .map(|t| t.is_empty())
                        .unwrap_or(true)
                    {
                        bail!("cached image of {variant} / seed {seed} has no parameters text");
                    }
                    let img = image::load_from_memory(&bytes)
                        .context("decoding a cached image")?
                        .to_rgb8();
                    row.push(Some(img));
                    result.outputs.insert(
                        format!(
                            "images/{}/{pi:02}-{seed}.png",
                            crate::names::folder_name(variant)
                        ),
                        blob.clone(),
                    );
                    manifest_cells.push(GridCell {
                        variant: variant.clone(),
                        prompt_index: pi,
                        prompt: prompt.clone(),
                        seed: *seed,
                        image: blob,
                    });
                }
            }
            grid.add_row(variant.clone(), row)?;
        }
        let grid_image = grid.render(&GridStyle::default())?;
        let grid_png = encode_png(&grid_image, &[("Software", "sdpipe")])?;
        let grid_blob = ctx.store.put_bytes(&grid_png)?;
        result
            .outputs
            .insert(Artifact::Grid.file_name().into(), grid_blob.clone());
        let manifest = GridManifest {
            variants: variants.clone(),
            columns,
            cells: manifest_cells,
            grid: grid_blob,
        };
        result.outputs.insert(
            Artifact::Manifest.file_name().into(),
            ctx.store
                .put_bytes(&serde_json::to_vec_pretty(&manifest)?)?,
        );
        let total = manifest.cells.len();
        result.stats.insert("images".into(), total.into());
        result
            .stats
            .insert("images_computed".into(), computed.into());
        result
            .stats
            .insert("images_reused".into(), (total - computed).into());
        result.summary = format!(
            "{} rows × {} columns ({computed} sampled, {} reused) → grid.png",
            variants.len(),
            manifest.columns.len(),
            total - computed
        );
        Ok(result)
    }
}

/// A hypernetwork output of an upstream stage, on `dev`.
fn read_hypernet<E: Elem, D: Device<E>>(
    ctx: &StageContext<'_>,
    blob: &BlobRef,
    label: &str,
    dev: &D,
) -> anyhow::Result<crate::train::hypernetwork::HyperNet<D, E>> {
    let tmp = tempfile::Builder::new().suffix(".pt").tempfile()?;
    std::fs::write(tmp.path(), ctx.store.read_blob(blob)?)?;
    let file = crate::formats::hypernetwork::read_hypernetwork(tmp.path())
        .with_context(|| format!("reading the hypernetwork of {label}"))?;
    Ok(crate::train::hypernetwork::HyperNet::from_host(&file, dev)?)
}

/// The kind of an extra-network tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkKind {
    /// `<lora:NAME:WEIGHT>`.
    Lora,
    /// `<hypernet:NAME:MULTIPLIER>`.
    Hypernet,
}

impl NetworkKind {
    /// The tag word.
    pub fn tag(self) -> &'static str {
        match self {
            NetworkKind::Lora => "lora",
            NetworkKind::Hypernet => "hypernet",
        }
    }
}

/// One A1111 extra-network tag of a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkTag {
    /// LoRA or hypernetwork.
    pub kind: NetworkKind,
    /// The upstream train stage instance.
    pub name: String,
    /// LoRA weight or hypernetwork multiplier (1 when left out).
    pub weight: f32,
}

/// Splits A1111's `<lora:NAME:WEIGHT>` and `<hypernet:NAME:MULTIPLIER>` tags off a prompt: the
/// text without them (trimmed) and the tags in order. Other `<…>` text stays as written.
pub fn parse_network_tags(prompt: &str) -> Result<(String, Vec<NetworkTag>), String> {
    let mut text = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(open) = rest.find('<') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('>') else { break };
        let inner = &after[..close];
        let (word, spec) = inner.split_once(':').unwrap_or((inner, ""));
        let kind = match word {
            "lora" => NetworkKind::Lora,
            "hypernet" => NetworkKind::Hypernet,
            _ => {
                text.push_str(&rest[..open + 1]);
                rest = after;
                continue;
            }
        };
        // NAME may itself hold `:` (matrix instance names); the weight is the last field
        // when it is a number.
        let (name, weight) = match spec.rsplit_once(':') {
            Some((name, w)) => match w.trim().parse::<f32>() {
                Ok(v) if v.is_finite() => (name.trim(), v),
                Ok(_) => return Err(format!("`<{inner}>`: `{w}` is not a finite number")),
                Err(_) => (spec.trim(), 1.0),
            },
            None => (spec.trim(), 1.0),
        };
        if name.is_empty() {
            return Err(format!("`<{inner}>` names no network"));
        }
        tags.push(NetworkTag {
            kind,
            name: name.to_string(),
            weight,
        });
        text.push_str(&rest[..open]);
        rest = &after[close + 1..];
    }
    text.push_str(rest);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    Ok((text, tags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_tags_are_stripped_and_parsed() {
        let (text, tags) = parse_network_tags(
            "a <lora:style:0.6> photo, <hypernet:h> of <b> zorb <hypernet:x:-1>",
        )
        .unwrap();
        assert_eq!(text, "a photo, of <b> zorb");
        assert_eq!(
            tags,
            vec![
                NetworkTag {
                    kind: NetworkKind::Lora,
                    name: "style".into(),
                    weight: 0.6
                },
                NetworkTag {
                    kind: NetworkKind::Hypernet,
                    name: "h".into(),
                    weight: 1.0
                },
                NetworkTag {
                    kind: NetworkKind::Hypernet,
                    name: "x".into(),
                    weight: -1.0
                },
            ]
        );
        assert_eq!(
            parse_network_tags("plain").unwrap(),
            ("plain".into(), vec![])
        );
        let (_, tags) = parse_network_tags("<lora:train@lr=1e-3:100:0.5><hypernet:x:y>").unwrap();
        assert_eq!(
            (tags[0].name.as_str(), tags[0].weight),
            ("train@lr=1e-3:100", 0.5)
        );
        assert_eq!((tags[1].name.as_str(), tags[1].weight), ("x:y", 1.0));
        assert!(
            parse_network_tags("<lora::1>")
                .unwrap_err()
                .contains("names no network")
        );
        assert!(parse_network_tags("<hypernet:>").is_err());
        assert!(parse_network_tags("<lora:a:inf>").is_err());
    }
}
