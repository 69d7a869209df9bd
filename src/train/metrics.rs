//! What a training run measured, written as the stage's `metrics.json` and read by the report.

use serde::{Deserialize, Serialize};

use super::Method;

/// Loss figures of a run, written as `metrics.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainMetrics {
    /// Method.
    pub method: Method,
    /// Steps trained.
    pub steps: u64,
    /// Loss on a fixed evaluation set (same items, noise and timesteps) before training.
    pub eval_loss_before: f32,
    /// The same after training.
    pub eval_loss_after: f32,
    /// Mean training loss over the first and the last tenth of the steps.
    pub train_loss_first: f32,
    /// See `train_loss_first`.
    pub train_loss_last: f32,
    /// Wall time of the training loop (this process; a resumed run counts its own part).
    pub wall_s: f64,
    /// Steps per second in this process.
    pub steps_per_s: f64,
    /// Peak resident memory of the process (VmHWM), MiB.
    pub peak_memory_mib: f64,
    /// Size of the trained artifact in bytes.
    pub artifact_bytes: u64,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// The step it resumed from (0 = fresh start).
    pub resumed_from: u64,
}

/// Peak resident memory of this process in MiB (Linux VmHWM; 0 elsewhere).
pub fn peak_memory_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}
