//! What a benchmark run reports: step times, throughput and memory, as a table or as the JSON
//! object `ref_bench.py` writes.

use serde::Serialize;

use super::BenchTask;
use crate::memory::human_bytes;

/// Step times in milliseconds over the timed iterations.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepTimes {
    /// Fastest.
    pub min: f64,
    /// Median (the figure throughput is computed from, as `ref_bench.py` does).
    pub median: f64,
    /// Mean.
    pub mean: f64,
}

impl StepTimes {
    /// The statistics of `ms` (not empty).
    pub fn of(ms: &[f64]) -> Self {
        let mut v = ms.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1);
        Self {
            min: v.first().copied().unwrap_or(0.0),
            median: v.get(v.len() / 2).copied().unwrap_or(0.0),
            mean: v.iter().sum::<f64>() / n as f64,
        }
    }
}

/// The result of one benchmark (the `--json` object).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The task (`lora-train`, …).
    pub task: BenchTask,
    /// `sd15`, `tiny` or the checkpoint path.
    pub arch: String,
    /// Samples (images) per step.
    pub batch: usize,
    /// Image side in pixels.
    pub resolution: usize,
    /// Latent side.
    pub latent_size: usize,
    /// Whether the UNet's blocks were recomputed in the backward pass.
    pub gradient_checkpointing: bool,
    /// Timed steps.
    pub iters: usize,
    /// Untimed steps before them.
    pub warmup: usize,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Compute precision (`f32`).
    pub precision: String,
    /// sdpipe's version.
    pub sdpipe_version: String,
    /// The figure's name as `ref_bench.py` writes it (`lora_train_bs1`, …).
    pub key: String,
    /// Throughput: batch / median step time.
    pub value: f64,
    /// Its unit (`samples/s`, `it/s`, `images/s`).
    pub unit: String,
    /// `ref_bench.py`'s note: the median step time.
    pub note: String,
    /// Step times.
    pub step_ms: StepTimes,
    /// Peak memory of the task in GiB (weights, optimiser state and activations), as
    /// `ref_bench.py`'s `*_peakmem`; `null` where the device cannot be probed.
    pub peakmem_gib: Option<f64>,
    /// The same in bytes.
    pub peak_memory_bytes: Option<u64>,
    /// How the peak was measured.
    pub memory_source: String,
    /// Parameters of the models the task loaded.
    pub model_params: usize,
    /// Parameters that train (0 for inference tasks).
    pub trainable_params: usize,
    /// LoRA rank (lora-train).
    pub rank: Option<usize>,
    /// What `plan` would estimate for this step's peak memory (training tasks; the same
    /// models loaded), in bytes: compare with `peak_memory_bytes`.
    pub memory_estimate_bytes: Option<u64>,
    /// The loss of the last step (training tasks; a sanity check that it ran).
    pub last_loss: Option<f32>,
}

impl BenchReport {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = vec![
            ("task".into(), self.task.to_string()),
            ("arch".into(), self.arch.clone()),
            (
                "shape".into(),
                format!(
                    "batch {}, {} px ({}² latents)",
                    self.batch, self.resolution, self.latent_size
                ),
            ),
            (
                "device".into(),
                format!("{} ({})", self.device, self.precision),
            ),
            (
                "iterations".into(),
                format!("{} timed after {} warm-up", self.iters, self.warmup),
            ),
            (
                "step ms".into(),
                format!(
                    "min {:.1} / median {:.1} / mean {:.1}",
                    self.step_ms.min, self.step_ms.median, self.step_ms.mean
                ),
            ),
            (
                "throughput".into(),
                format!("{:.3} {}", self.value, self.unit),
            ),
        ];
        let peak = match self.peak_memory_bytes {
            Some(b) => format!("{} — {}", human_bytes(b), self.memory_source),
            None => format!("unknown — {}", self.memory_source),
        };
        rows.push(("peak memory".into(), peak));
        rows.push((
            "parameters".into(),
            format!(
                "{:.2} M loaded, {:.3} M trained",
                self.model_params as f64 / 1e6,
                self.trainable_params as f64 / 1e6
            ),
        ));
        if let (Some(e), Some(m)) = (self.memory_estimate_bytes, self.peak_memory_bytes) {
            rows.push((
                "memory estimate".into(),
                format!(
                    "{} (what `plan` estimates; measured / estimate {:.2})",
                    human_bytes(e),
                    m as f64 / e.max(1) as f64
                ),
            ));
        }
        if let Some(l) = self.last_loss {
            rows.push(("last loss".into(), format!("{l:.4}")));
        }
        let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = format!("sdpipe {} bench\n", self.sdpipe_version);
        for (k, v) in rows {
            out.push_str(&format!("  {k:<w$}  {v}\n"));
        }
        out
    }
}
