//! The method-comparison report: what it holds ([`ComparisonReport`], written as
//! `report.json`), and its renderings: a self-contained HTML page ([`html`]), Markdown
//! ([`markdown`]) and the loss-curve plot as SVG ([`svg`]).
//!
//! The `report` stage (`crate::stages`) gathers the figures from the upstream records; this
//! module only formats them, so the renderings can be tested without running a pipeline.

pub mod html;
pub mod markdown;
pub mod svg;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::train::TrainMetrics;

/// dfdx's version, as locked in `Cargo.lock` (a unit test keeps the two in step).
pub const DFDX_VERSION: &str = "0.13.0";

/// Everything the report shows, machine-readable (`report.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComparisonReport {
    /// Page title.
    pub title: String,
    /// The world concept the methods learn, when set (enables the fidelity columns).
    pub concept: Option<String>,
    /// Rows and columns of the sample grid.
    pub grid: GridSummary,
    /// One entry per grid row, top to bottom (`base` first).
    pub variants: Vec<VariantReport>,
    /// Where the numbers come from.
    pub provenance: Provenance,
}

/// The layout of the sample grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridSummary {
    /// The sample_grid stage instance.
    pub stage: String,
    /// Row names (variants).
    pub rows: Vec<String>,
    /// Column labels (prompt · seed).
    pub columns: Vec<String>,
}

/// One grid row: the base model, a training result or a merge.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantReport {
    /// Row name (`base`, or the stage instance that made it).
    pub name: String,
    /// What it is, in words (`base model`, `LoRA`, `LoRA merged into a checkpoint`, …).
    pub method: String,
    /// Kind of the stage that made it (`train`, `merge`); none for the base model.
    pub stage_kind: Option<String>,
    /// Key of that stage's result.
    pub key: Option<String>,
    /// For merges: the stages or models it was made from.
    pub sources: Vec<String>,
    /// Training figures (train stages).
    pub training: Option<TrainMetrics>,
    /// The file the stage produced and its size.
    pub artifact: Option<Artifact>,
    /// Wall time of the stage that made it (training loop plus setup; merge time), seconds.
    pub stage_seconds: Option<f64>,
    /// Per-step training loss (train stages).
    pub loss: Option<Vec<f32>>,
    /// The validation loss on held-out images, as (step, loss) (train stages with
    /// `validate_every`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<Vec<(u64, f32)>>,
    /// What sets this train stage apart from the report's other train stages of its method:
    /// `key=value` of each train key whose value differs between them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub settings: Vec<String>,
    /// Fidelity averaged over the row's images (when a concept is set).
    pub quality: Option<QualitySummary>,
    /// Every image of the row with its scores.
    pub images: Vec<ImageScore>,
}

/// A produced file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    /// Output name (`lora.safetensors`, …).
    pub file: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// Mean fidelity of a row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualitySummary {
    /// Mean subject fidelity over the row's images (0..1).
    pub subject: f64,
    /// Mean prompt fidelity over the images whose prompt the detector can check.
    pub prompt: Option<f64>,
    /// Images scored.
    pub images: usize,
    /// Images with a prompt fidelity.
    pub prompt_images: usize,
}

impl QualitySummary {
    /// The means of `images` (none when no image has a subject score).
    pub fn of(images: &[ImageScore]) -> Option<QualitySummary> {
        let subject: Vec<f64> = images.iter().filter_map(|i| i.subject).collect();
        if subject.is_empty() {
            return None;
        }
        let prompt: Vec<f64> = images.iter().filter_map(|i| i.prompt_fidelity).collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        Some(QualitySummary {
            subject: mean(&subject),
            prompt: (!prompt.is_empty()).then(|| mean(&prompt)),
            images: subject.len(),
            prompt_images: prompt.len(),
        })
    }
}

/// One sampled image and its scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageScore {
    /// The prompt as written in the grid stage.
    pub prompt: String,
    /// The seed.
    pub seed: u64,
    /// The image in the grid stage's outputs (`images/<variant>/<prompt>-<seed>.png`).
    pub file: String,
    /// Subject fidelity (0..1).
    pub subject: Option<f64>,
    /// Prompt fidelity (0..1), when the prompt says something checkable.
    pub prompt_fidelity: Option<f64>,
}

/// Where the numbers come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// Pipeline name.
    pub pipeline: String,
    /// The pipeline file.
    pub pipeline_file: String,
    /// The pipeline seed.
    pub seed: u64,
    /// Key of the report itself.
    pub report_key: String,
    /// Every stage the report read, in `needs` order.
    pub stages: Vec<StageProvenance>,
    /// sdpipe version.
    pub sdpipe_version: String,
    /// dfdx version.
    pub dfdx_version: String,
    /// The device model stages ran on (`cpu`, `cuda:0`).
    pub device: String,
    /// Float type of the model stages.
    pub precision: String,
    /// CPU cores available to this process.
    pub cpu_cores: usize,
    /// Operating system and architecture.
    pub os: String,
    /// When the report was made (RFC 3339, UTC).
    pub created: String,
    /// The base model as given in `[pipeline] base_model`.
    pub base_model: Option<String>,
    /// Hash of the base model: the file's blake3, or (diffusers folder) blake3 of the sorted
    /// list of its files' hashes.
    pub base_model_hash: Option<String>,
    /// The base model's files and their blake3, as hashed into the stage keys.
    pub base_model_files: BTreeMap<String, String>,
}

/// One upstream stage in the provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageProvenance {
    /// Instance name.
    pub name: String,
    /// Kind.
    pub kind: String,
    /// Key of its result.
    pub key: String,
    /// sdpipe version that computed it.
    pub tool_version: String,
    /// When it was computed (seconds since the epoch).
    pub created_unix: u64,
}

/// One metric's definition, as the report explains it.
pub struct Definition {
    /// Column name.
    pub name: &'static str,
    /// What it measures.
    pub text: &'static str,
}

/// The definitions of the table's columns and of the plot.
pub const DEFINITIONS: &[Definition] = &[
    Definition {
        name: "Training time",
        text: "Wall time of the training loop in the process that finished it (a resumed run counts only its own part; setup and model loading excluded).",
    },
    Definition {
        name: "Steps/s",
        text: "Optimiser steps per second of that loop (each step: all micro-batches of gradient accumulation).",
    },
    Definition {
        name: "Peak memory",
        text: "Peak resident memory of the training process (VmHWM), MiB. Stages that run in one process share it, so it is an upper bound for the method.",
    },
    Definition {
        name: "Artifact",
        text: "Size of the file the stage produced (LoRA, embedding, hypernetwork or full checkpoint).",
    },
    Definition {
        name: "Final loss",
        text: "Mean training loss (noise-prediction MSE) over the last tenth of the steps.",
    },
    Definition {
        name: "Eval loss",
        text: "Loss on a fixed evaluation set (same items, noise and timesteps) before → after training; lower after means the model fits the training images better.",
    },
    Definition {
        name: "Subject fidelity",
        text: "Mean over the row's grid images of the world detector's subject score (0–1): the concept is present and looks like the training images. The base model row is the baseline; a method that learned the concept scores above it.",
    },
    Definition {
        name: "Prompt fidelity",
        text: "Mean over the row's grid images whose prompt the detector can check (background colour, position, …) of how well that part of the prompt is respected (0–1).",
    },
    Definition {
        name: "Loss curves",
        text: "Per-step training loss of every method: thin faint lines are the raw values, thick lines an exponential moving average (span = 1/8 of the steps, bias-corrected at the start). The y axis stops at the 99th percentile of the raw values; higher spikes are drawn at the top edge.",
    },
];

/// `"1.2 MiB"`-style sizes.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v < 10.0 {
        format!("{v:.2} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `"12.3 s"`, `"2 min 05 s"`.
pub fn human_seconds(s: f64) -> String {
    if !s.is_finite() {
        return "—".into();
    }
    if s < 60.0 {
        format!("{s:.1} s")
    } else {
        let total = s.round() as u64;
        format!("{} min {:02} s", total / 60, total % 60)
    }
}

/// One table row as display strings, shared by the HTML and Markdown renderings.
#[derive(Debug, Clone, PartialEq)]
pub struct TableRow {
    /// Variant (row) name.
    pub variant: String,
    /// Method in words (with its sources for merges).
    pub method: String,
    /// Training time.
    pub time: String,
    /// Steps per second.
    pub steps_per_s: String,
    /// Peak memory.
    pub memory: String,
    /// Artifact size.
    pub artifact: String,
    /// Final training loss.
    pub final_loss: String,
    /// Eval loss before → after.
    pub eval_loss: String,
    /// Mean subject fidelity (and the difference to the base model).
    pub subject: String,
    /// Mean prompt fidelity (and the difference to the base model).
    pub prompt: String,
}

/// Column headers, in [`TableRow`] order.
pub const TABLE_HEADERS: [&str; 10] = [
    "Variant",
    "Method",
    "Training time",
    "Steps/s",
    "Peak memory",
    "Artifact",
    "Final loss",
    "Eval loss before → after",
    "Subject fidelity",
    "Prompt fidelity",
];

impl TableRow {
    /// The cells in [`TABLE_HEADERS`] order.
    pub fn cells(&self) -> [&str; 10] {
        [
            &self.variant,
            &self.method,
            &self.time,
            &self.steps_per_s,
            &self.memory,
            &self.artifact,
            &self.final_loss,
            &self.eval_loss,
            &self.subject,
            &self.prompt,
        ]
    }
}

const DASH: &str = "—";

impl ComparisonReport {
    /// The quality of the base-model row, the baseline of the fidelity columns.
    pub fn baseline(&self) -> Option<&QualitySummary> {
        self.variants
            .iter()
            .find(|v| v.stage_kind.is_none())
            .and_then(|v| v.quality.as_ref())
    }

    /// The comparison table, one row per variant.
    pub fn table(&self) -> Vec<TableRow> {
        let base = self.baseline();
        let fidelity = |value: Option<f64>, baseline: Option<f64>, is_base: bool| match value {
            None => DASH.to_string(),
            Some(v) => match baseline {
                Some(b) if !is_base => format!("{v:.2} ({:+.2})", v - b),
                _ => format!("{v:.2}"),
            },
        };
        self.variants
            .iter()
            .map(|v| {
                let t = v.training.as_ref();
                let is_base = v.stage_kind.is_none();
                let mut method = v.method.clone();
                if !v.sources.is_empty() {
                    method = format!("{method} (from {})", v.sources.join(", "));
                }
                if !v.settings.is_empty() {
                    method = format!("{method} · {}", v.settings.join(", "));
                }
                TableRow {
                    variant: v.name.clone(),
                    method,
                    time: t.map_or(DASH.into(), |t| human_seconds(t.wall_s)),
                    steps_per_s: t.map_or(DASH.into(), |t| format!("{:.2}", t.steps_per_s)),
                    memory: t.map_or(DASH.into(), |t| format!("{:.0} MiB", t.peak_memory_mib)),
                    artifact: v
                        .artifact
                        .as_ref()
                        .map_or(DASH.into(), |a| human_bytes(a.bytes)),
                    final_loss: t.map_or(DASH.into(), |t| format!("{:.4}", t.train_loss_last)),
                    eval_loss: t.map_or(DASH.into(), |t| {
                        format!("{:.4} → {:.4}", t.eval_loss_before, t.eval_loss_after)
                    }),
                    subject: fidelity(
                        v.quality.as_ref().map(|q| q.subject),
                        base.map(|b| b.subject),
                        is_base,
                    ),
                    prompt: fidelity(
                        v.quality.as_ref().and_then(|q| q.prompt),
                        base.and_then(|b| b.prompt),
                        is_base,
                    ),
                }
            })
            .collect()
    }

    /// The provenance as (label, value) lines, shared by the HTML and Markdown renderings.
    pub fn provenance_lines(&self) -> Vec<(String, String)> {
        let p = &self.provenance;
        let mut lines = vec![
            ("Pipeline".to_string(), p.pipeline.clone()),
            ("Pipeline file".to_string(), p.pipeline_file.clone()),
            ("Seed".to_string(), p.seed.to_string()),
            ("Report key".to_string(), p.report_key.clone()),
            ("sdpipe".to_string(), p.sdpipe_version.clone()),
            ("dfdx".to_string(), p.dfdx_version.clone()),
            (
                "Device".to_string(),
                format!("{} ({}), {} CPU cores", p.device, p.precision, p.cpu_cores),
            ),
            ("OS".to_string(), p.os.clone()),
            ("Created".to_string(), p.created.clone()),
        ];
        if let Some(model) = &p.base_model {
            let hash = p
                .base_model_hash
                .as_deref()
                .map(|h| format!(" (blake3 {h})"))
                .unwrap_or_default();
            lines.push(("Base model".to_string(), format!("{model}{hash}")));
        }
        if let Some(c) = &self.concept {
            lines.push(("Concept".to_string(), c.clone()));
        }
        lines
    }
}

/// Display name of a training method as written in `method = "…"`.
pub fn method_label(method: &str) -> String {
    match method {
        "lora" => "LoRA".into(),
        "textual_inversion" => "Textual Inversion".into(),
        "dreambooth" => "DreamBooth".into(),
        "hypernetwork" => "Hypernetwork".into(),
        "locon" => "LoCon".into(),
        "loha" => "LoHa".into(),
        "lokr" => "LoKr".into(),
        "dora" => "DoRA".into(),
        other => other.into(),
    }
}

/// Display name of a merge mode as written in `mode = "…"`.
pub fn merge_label(mode: &str) -> String {
    match mode {
        "lora_into_checkpoint" => "LoRA merged into a checkpoint".into(),
        "combine_loras" => "LoRAs combined".into(),
        "extract_lora" => "LoRA extracted from a checkpoint".into(),
        "weighted_sum" => "checkpoint weighted sum".into(),
        "add_difference" => "checkpoint add difference".into(),
        other => format!("merge ({other})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dfdx_version_matches_the_lock_file() {
        let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock"))
            .expect("Cargo.lock");
        let entry = format!("name = \"dfdx\"\nversion = \"{DFDX_VERSION}\"");
        assert!(
            lock.contains(&entry),
            "Cargo.lock locks another dfdx than DFDX_VERSION = {DFDX_VERSION}"
        );
    }

    #[test]
    fn sizes_and_times_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.50 MiB");
        assert_eq!(human_bytes(20 * 1024 * 1024), "20.0 MiB");
        assert_eq!(human_seconds(4.26), "4.3 s");
        assert_eq!(human_seconds(125.0), "2 min 05 s");
    }

    #[test]
    fn quality_means_skip_missing_scores() {
        let img = |s: Option<f64>, p: Option<f64>| ImageScore {
            prompt: "p".into(),
            seed: 1,
            file: "f".into(),
            subject: s,
            prompt_fidelity: p,
        };
        let q = QualitySummary::of(&[
            img(Some(0.2), None),
            img(Some(0.6), Some(1.0)),
            img(None, Some(0.0)),
        ])
        .unwrap();
        assert!((q.subject - 0.4).abs() < 1e-12);
        assert_eq!(q.prompt, Some(0.5));
        assert_eq!((q.images, q.prompt_images), (2, 2));
        assert_eq!(QualitySummary::of(&[img(None, None)]), None);
    }
}
