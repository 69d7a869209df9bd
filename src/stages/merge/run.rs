//! What a `merge` stage does when it runs: open its sources, apply the mode, write the output
//! with its recipe.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use super::{MergeMode, MergeParams, Origin, RECIPE_KEY, Source};
use crate::cache::{BlobRef, canonical_json, hash_bytes};
use crate::diffusion::Checkpoint;
use crate::formats::checkpoint::{ModelTensors, write_single_file};
use crate::formats::lora::{KohyaMetadata, LoraNetwork, read_lora, write_kohya};
use crate::merge::{
    CombineMethod, ExtractOptions, add_difference, combine_loras, extract_lora, known_modules,
    known_modules_of, merge_loras, weighted_sum,
};
use crate::settings::PipelineSettings;
use crate::stages::artifact::Artifact;
use crate::stages::context::{StageContext, StageResult};
use crate::stages::model::{model_inputs, open_checkpoint};

impl MergeParams {
    /// Runs the stage: opens its sources, applies the mode and publishes the output with its
    /// recipe (metadata key and `recipe.json`).
    pub(in crate::stages) fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        let started = std::time::Instant::now();
        let settings = &ctx.settings;
        let scratch = ctx.scratch()?;
        std::fs::create_dir_all(&scratch)?;
        let mut recipe_inputs = Vec::new();
        let mut result = StageResult::default();
        let mode = self.mode.name();
        // every named stage must be upstream with the right output, before any heavy reading
        let mut carried = CarriedScheduler::default();
        for (field, file, sources) in [
            ("models", Artifact::Checkpoint, self.model_sources()),
            ("loras", Artifact::Lora, Self::sources(&self.loras)),
        ] {
            for src in sources {
                if let Origin::Stage(name) = &src.origin {
                    let record = upstream_record(ctx, name, file, field)?;
                    output(record, name, file)?;
                    carried.carry(name, record)?;
                }
            }
        }
        // A source trained with another parameterisation or schedule makes the result one too.
        if let Some((_, blob)) = carried.0 {
            result
                .outputs
                .insert(Artifact::SchedulerConfig.file_name().into(), blob);
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

/// The sampling scheduler config the merge's stage sources carry (see
/// [`Artifact::SchedulerConfig`]): at most one, since sources trained to predict different
/// things do not mix.
#[derive(Default)]
struct CarriedScheduler(Option<(String, crate::cache::BlobRef)>);

impl CarriedScheduler {
    /// Takes note of `record`'s scheduler config, refusing one that differs from another
    /// source's.
    fn carry(&mut self, name: &str, record: &crate::cache::Record) -> anyhow::Result<()> {
        let Some(blob) = Artifact::SchedulerConfig.in_record(record) else {
            return Ok(());
        };
        match &self.0 {
            Some((other, seen)) if seen.digest != blob.digest => bail!(
                "`{other}` and `{name}` were trained with different scheduler configs \
                 (prediction_type or zero_terminal_snr): their weights predict different things \
                 and do not merge"
            ),
            Some(_) => Ok(()),
            None => {
                self.0 = Some((name.to_string(), blob.clone()));
                Ok(())
            }
        }
    }
}

pub(super) fn input_name(kind: &str, i: usize) -> String {
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
pub(in crate::stages) fn config_dir(settings: &PipelineSettings) -> Option<PathBuf> {
    settings
        .model_config
        .clone()
        .or_else(|| settings.base_model.clone().filter(|p| p.is_dir()))
}

/// Opens a checkpoint file (or folder) with this pipeline's configs.
fn open_model_file(settings: &PipelineSettings, path: &Path) -> anyhow::Result<Checkpoint> {
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
pub(in crate::stages) fn open_model_blob(
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
