//! `report`: the method comparison. Reads the sample grid and every training and merge result
//! in `needs` (their records' figures and loss curves), scores each grid image with the world's
//! detectors when `concept` is set (references: the items of a `preprocess` stage in `needs`,
//! i.e. the training images), and writes `report.html` (self-contained), `report.md`,
//! `report.json`, `grid.png` and `loss.svg`.

use crate::stages::artifact::Artifact as StageArtifact;
use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::context::{StageContext, StageResult};
use super::sample_grid::parse_network_tags;
use super::{GridManifest, ParamError, PreprocessManifest, StageParams, TrainMetrics};
use crate::cache::{canonical_json, hash_bytes};
use crate::comparison::{
    Artifact, ComparisonReport, DFDX_VERSION, GridSummary, ImageScore, Provenance, QualitySummary,
    StageProvenance, VariantReport, html, markdown, merge_label, method_label, svg,
};
use crate::settings::PipelineSettings;

/// Implementation version (part of the key); bumped whenever the outputs change.
pub const VERSION: u32 = 1;

/// `[stage.NAME] kind = "report"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportParams {
    /// Page title (default: "Method comparison: PIPELINE").
    #[serde(default)]
    pub title: Option<String>,
    /// The world concept the methods learn (see `crate::world`): enables subject and prompt
    /// fidelity.
    #[serde(default)]
    pub concept: Option<String>,
}

/// The names of the concepts the world knows, for messages.
fn known_concepts() -> Vec<&'static str> {
    crate::world::CONCEPTS.iter().map(|c| c.name).collect()
}

impl ReportParams {
    pub(super) fn validate(&self) -> Result<(), ParamError> {
        if let Some(name) = &self.concept
            && crate::world::concept(name).is_none()
        {
            let known = known_concepts();
            let hint = crate::names::did_you_mean(name, known.iter().copied())
                .map(|s| format!("did you mean `{s}`? "))
                .unwrap_or_default();
            return Err(ParamError::new(
                "concept",
                format!("unknown concept `{name}`"),
                format!("{hint}known concepts: {}", known.join(", ")),
            ));
        }
        if self.title.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(ParamError::new(
                "title",
                "`title` is empty",
                "leave it out for the default title, or write one",
            ));
        }
        Ok(())
    }

    pub(super) fn key_params(&self, _settings: &PipelineSettings) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if self.concept.is_some()
            && let Some(map) = v.as_object_mut()
        {
            // The scores come from the world's detectors: a change of them reruns the report.
            map.insert("world_version".into(), crate::world::VERSION.into());
        }
        v
    }

    pub(super) fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        let settings = &ctx.settings;
        let (grid_instance, grid_record) = ctx.upstream_of_kind("sample_grid")?;
        let manifest: GridManifest =
            ctx.read_json(grid_record, StageArtifact::Manifest.file_name())?;
        let grid_png = ctx.store.read_blob(&manifest.grid)?;

        let concept = match &self.concept {
            Some(name) => Some(crate::world::concept(name).with_context(|| {
                format!(
                    "unknown concept `{name}` (known: {})",
                    known_concepts().join(", ")
                )
            })?),
            None => None,
        };
        let references = if concept.is_some() {
            self.references(ctx)?
        } else {
            Vec::new()
        };

        let bar = ctx.progress.bar(
            manifest.cells.len() as u64,
            &format!("{} scoring", ctx.instance.name),
        );
        let mut variants = Vec::new();
        for name in &manifest.variants {
            let mut images = Vec::new();
            for cell in manifest.cells.iter().filter(|c| &c.variant == name) {
                ctx.check_cancelled()?;
                let (subject, prompt_fidelity) = match concept {
                    Some(concept) => {
                        let bytes = ctx.store.read_blob(&cell.image)?;
                        let img = image::load_from_memory(&bytes)
                            .with_context(|| {
                                format!("decoding the image of {name} / seed {}", cell.seed)
                            })?
                            .to_rgb8();
                        let text = parse_network_tags(&cell.prompt)
                            .map(|(t, _)| t)
                            .unwrap_or_else(|_| cell.prompt.clone());
                        let q = crate::world::score_image(&img, &text, concept, &references);
                        (Some(q.subject), q.prompt)
                    }
                    None => (None, None),
                };
                bar.inc(1);
                images.push(ImageScore {
                    prompt: cell.prompt.clone(),
                    seed: cell.seed,
                    file: format!(
                        "images/{}/{:02}-{}.png",
                        crate::names::folder_name(name),
                        cell.prompt_index,
                        cell.seed
                    ),
                    subject,
                    prompt_fidelity,
                });
            }
            variants.push(self.variant(ctx, name, images)?);
        }
        bar.finish_and_clear();
        mark_differences(ctx, &mut variants);

        let report = ComparisonReport {
            title: self
                .title
                .clone()
                .unwrap_or_else(|| format!("Method comparison: {}", ctx.settings.name.as_str())),
            concept: concept.map(|c| c.name.to_string()),
            grid: GridSummary {
                stage: grid_instance.name.clone(),
                rows: manifest.variants.clone(),
                columns: manifest.columns.clone(),
            },
            variants,
            provenance: provenance(ctx, settings),
        };

        let curves: Vec<svg::Curve<'_>> = report
            .variants
            .iter()
            .filter_map(|v| {
                v.loss.as_deref().map(|loss| svg::Curve {
                    label: &v.name,
                    loss,
                    validation: v.validation.as_deref().unwrap_or_default(),
                })
            })
            .collect();
        let loss_svg = if curves.is_empty() {
            None
        } else {
            Some(svg::loss_plot(&curves, "Training loss", 760, 420).map_err(anyhow::Error::msg)?)
        };

        let mut result = StageResult::default();
        let page = html::render(
            &report,
            &grid_png,
            loss_svg.as_deref().map(svg::for_inline_html).as_deref(),
        );
        let put = |bytes: &[u8]| ctx.store.put_bytes(bytes);
        result
            .outputs
            .insert("report.html".into(), put(page.as_bytes())?);
        result.outputs.insert(
            "report.md".into(),
            put(markdown::render(&report, loss_svg.is_some()).as_bytes())?,
        );
        result.outputs.insert(
            "report.json".into(),
            put(&serde_json::to_vec_pretty(&report)?)?,
        );
        result.outputs.insert(
            StageArtifact::Grid.file_name().into(),
            manifest.grid.clone(),
        );
        if let Some(svg) = &loss_svg {
            result
                .outputs
                .insert("loss.svg".into(), put(svg.as_bytes())?);
        }

        result
            .stats
            .insert("variants".into(), report.variants.len().into());
        let mut summary = format!("{} variants", report.variants.len());
        if let Some(base) = report.baseline() {
            result
                .stats
                .insert("base_subject".into(), base.subject.into());
            let best = report
                .variants
                .iter()
                .filter(|v| v.stage_kind.is_some())
                .filter_map(|v| v.quality.as_ref().map(|q| (v, q.subject)))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            summary.push_str(&format!(", subject fidelity base {:.2}", base.subject));
            if let Some((v, s)) = best {
                summary.push_str(&format!(", best {s:.2} ({})", v.name));
            }
        }
        summary.push_str(" → report.html");
        result.summary = summary;
        Ok(result)
    }

    /// The training images of a `preprocess` stage in `needs` (none without one).
    fn references(&self, ctx: &StageContext<'_>) -> anyhow::Result<Vec<RgbImage>> {
        let Some((_, record)) = ctx
            .upstream
            .iter()
            .find(|(i, _)| i.params.kind() == "preprocess")
        else {
            tracing::warn!(
                "{}: no preprocess stage in `needs`: subject fidelity has no reference images",
                ctx.instance.name
            );
            return Ok(Vec::new());
        };
        let manifest: PreprocessManifest =
            ctx.read_json(record, StageArtifact::Manifest.file_name())?;
        let mut out = Vec::new();
        for item in &manifest.items {
            let bytes = ctx.store.read_blob(&item.tensor)?;
            let (data, shape) = super::encode_latents::read_f32(&bytes, "image")
                .with_context(|| format!("reading the preprocessed item {}", item.name))?;
            let [3, h, w] = shape[..] else {
                bail!(
                    "preprocessed item {}: shape {shape:?}, expected [3, h, w]",
                    item.name
                );
            };
            // [-1, 1] → [0, 1]
            let unit: Vec<f32> = data.iter().map(|v| (v + 1.0) / 2.0).collect();
            out.push(crate::render::rgb_image_from_chw(
                &unit, h as u32, w as u32,
            )?);
        }
        Ok(out)
    }

    /// The report entry of grid row `name`, from the upstream record that made it.
    fn variant(
        &self,
        ctx: &StageContext<'_>,
        name: &str,
        images: Vec<ImageScore>,
    ) -> anyhow::Result<VariantReport> {
        let quality = QualitySummary::of(&images);
        let mut v = VariantReport {
            name: name.to_string(),
            method: "base model".into(),
            stage_kind: None,
            key: None,
            sources: Vec::new(),
            training: None,
            artifact: None,
            stage_seconds: None,
            loss: None,
            validation: None,
            settings: Vec::new(),
            quality,
            images,
        };
        if name == "base" {
            return Ok(v);
        }
        // A train stage's EMA row (`NAME#ema`) and saved steps (`NAME#step=N`) are its stage's
        // other artifacts.
        let (stage_name, part) = match name.split_once('#') {
            Some((stage, part)) => (stage, Some(part)),
            None => (name, None),
        };
        let Some((instance, record)) = ctx.upstream.iter().find(|(i, _)| i.name == stage_name)
        else {
            // A grid row whose stage is not in the report's `needs`: its images are scored,
            // its figures are unknown here.
            v.method = "(not in the report's needs)".into();
            v.stage_kind = Some("unknown".into());
            return Ok(v);
        };
        v.stage_kind = Some(instance.params.kind().to_string());
        v.key = Some(record.key.clone());
        v.stage_seconds = Some(record.duration_s);
        let step = part.and_then(|p| p.strip_prefix("step=")?.parse::<u64>().ok());
        v.artifact = StageArtifact::TRAINED.iter().find_map(|kind| {
            let blob = match (part, step) {
                (None, _) => kind.in_record(record),
                (Some("ema"), _) => kind.ema(record),
                (_, Some(n)) => kind
                    .snapshots(record)
                    .into_iter()
                    .find_map(|(s, b)| (s == n).then_some(b)),
                _ => None,
            };
            blob.map(|b| Artifact {
                file: match part {
                    Some(p) => format!("{p}/{}", kind.file_name()),
                    None => kind.file_name().to_string(),
                },
                bytes: b.size,
            })
        });
        match &instance.params {
            StageParams::Train(p) => {
                let method = serde_json::to_value(p.method)?;
                v.method = method_label(method.as_str().unwrap_or_default());
                if let Some(part) = part {
                    // The run's figures and loss curve belong to its final row.
                    v.method = match step {
                        Some(n) => format!("{} after step {n}", v.method),
                        None if part == "ema" => format!("{} (EMA of the weights)", v.method),
                        None => format!("{} ({part})", v.method),
                    };
                    return Ok(v);
                }
                v.training = serde_json::from_value::<TrainMetrics>(record.stats.clone()).ok();
                if let Some(blob) = record.outputs.get("validation.csv") {
                    v.validation = Some(parse_validation(&ctx.store.read_blob(blob)?)?);
                }
                if StageArtifact::LossCurve.in_record(record).is_some() {
                    v.loss = Some(ctx.read_json(record, StageArtifact::LossCurve.file_name())?);
                }
            }
            StageParams::Merge(p) => {
                let mode = serde_json::to_value(p.mode)?;
                v.method = merge_label(mode.as_str().unwrap_or_default());
                v.sources = p.loras.iter().chain(&p.models).cloned().collect();
            }
            other => v.method = other.kind().to_string(),
        }
        Ok(v)
    }
}

/// Sets each train variant's `settings` to the train keys whose values differ between the
/// report's train stages of the same method (`min_snr_gamma=5.0`, `optimizer=prodigy`), so a
/// comparison of options says what each row changed. Stages alone with their method list
/// nothing.
fn mark_differences(ctx: &StageContext<'_>, variants: &mut [VariantReport]) {
    let mut params: BTreeMap<String, (String, BTreeMap<String, String>)> = BTreeMap::new();
    for (instance, _) in &ctx.upstream {
        if let StageParams::Train(p) = &instance.params {
            let mut flat = BTreeMap::new();
            flatten("", &p.key_params(ctx.settings), &mut flat);
            for k in ["seed", "device", "method"] {
                flat.remove(k);
            }
            let method = serde_json::to_value(p.method)
                .ok()
                .and_then(|m| m.as_str().map(String::from))
                .unwrap_or_default();
            params.insert(instance.name.clone(), (method, flat));
        }
    }
    for v in variants.iter_mut().filter(|v| !v.name.contains('#')) {
        let Some((method, mine)) = params.get(&v.name) else {
            continue;
        };
        let peers: Vec<&BTreeMap<String, String>> = params
            .iter()
            .filter(|(name, (m, _))| m == method && *name != &v.name)
            .map(|(_, (_, p))| p)
            .collect();
        if peers.is_empty() {
            continue;
        }
        let keys: std::collections::BTreeSet<&String> = peers
            .iter()
            .flat_map(|p| p.keys())
            .chain(mine.keys())
            .collect();
        v.settings = keys
            .into_iter()
            .filter(|k| peers.iter().any(|p| p.get(*k) != mine.get(*k)))
            .filter_map(|k| mine.get(k).map(|value| format!("{k}={value}")))
            .collect();
    }
}

/// `value` as dotted keys (`lora.rank`) → compact text (strings unquoted, arrays as JSON).
fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        serde_json::Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// A train stage's `validation.csv` (`step,validation_loss` rows).
fn parse_validation(bytes: &[u8]) -> anyhow::Result<Vec<(u64, f32)>> {
    let text = std::str::from_utf8(bytes).context("validation.csv is not UTF-8")?;
    text.lines()
        .skip(1)
        .map(|line| {
            let (step, loss) = line
                .split_once(',')
                .with_context(|| format!("validation.csv: bad row {line:?}"))?;
            Ok((step.parse()?, loss.parse()?))
        })
        .collect()
}

/// The run's provenance as the report records it.
fn provenance(ctx: &StageContext<'_>, settings: &PipelineSettings) -> Provenance {
    let stages = ctx
        .upstream
        .iter()
        .map(|(i, r)| StageProvenance {
            name: i.name.clone(),
            kind: i.params.kind().to_string(),
            key: r.key.clone(),
            tool_version: r.tool_version.clone(),
            created_unix: r.created_unix,
        })
        .collect();
    // The base model's files as the upstream keys hashed them.
    let mut files = BTreeMap::new();
    for (_, r) in &ctx.upstream {
        if let Some(m) = &r.material {
            for (name, hash) in &m.inputs {
                if name == "base_model" || name.starts_with("base_model/") {
                    files.insert(name.clone(), hash.clone());
                }
            }
        }
    }
    let base_model_hash = match files.get("base_model") {
        Some(h) if files.len() == 1 => Some(h.clone()),
        _ if !files.is_empty() => Some(hash_bytes(
            canonical_json(&serde_json::to_value(&files).unwrap_or_default()).as_bytes(),
        )),
        _ => None,
    };
    Provenance {
        pipeline: ctx.settings.name.as_str().to_string(),
        pipeline_file: ctx.pipeline_file.display().to_string(),
        seed: settings.seed,
        report_key: ctx.key.to_string(),
        stages,
        sdpipe_version: env!("CARGO_PKG_VERSION").to_string(),
        dfdx_version: DFDX_VERSION.to_string(),
        device: crate::device::resolve(settings.device),
        precision: serde_json::to_value(settings.precision)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{:?}", settings.precision)),
        cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        base_model: settings
            .base_model
            .as_ref()
            .map(|p| p.display().to_string()),
        base_model_hash,
        base_model_files: files,
    }
}
