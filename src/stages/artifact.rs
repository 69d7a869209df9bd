//! The files stages hand each other, by kind: a stage asks an upstream record for
//! `Artifact::Lora`, never for the string `"lora.safetensors"`, so a name is spelled once and a
//! typo is a compile error. The names are also the published file names (and part of every
//! downstream key through the output digest): changing one changes keys.

use crate::cache::{BlobRef, Record};

/// One kind of stage output that other stages read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Artifact {
    /// A LoRA in kohya's format: `train` (method lora), `merge` (extract).
    Lora,
    /// A textual-inversion embedding in A1111's format.
    Embedding,
    /// The same embedding in diffusers' `learned_embeds` format.
    DiffusersEmbedding,
    /// A hypernetwork as A1111 saves it (a torch pickle).
    Hypernetwork,
    /// The same hypernetwork as safetensors.
    HypernetworkSafetensors,
    /// A full single-file checkpoint: `train` (dreambooth), `merge`, `pretrain`.
    Checkpoint,
    /// The diffusers scheduler config a trained variant is sampled with, written by `train`
    /// only when it differs from the base model's (another `prediction_type`, zero terminal
    /// SNR).
    SchedulerConfig,
    /// The loss per step of a training stage.
    LossCurve,
    /// A labelled grid image.
    Grid,
    /// The stage's manifest (what its per-item outputs are).
    Manifest,
}

impl Artifact {
    /// The variant outputs a report or grid looks for, in order: what a `train`, `merge` or
    /// `pretrain` stage hands on.
    pub const TRAINED: [Artifact; 4] = [
        Artifact::Lora,
        Artifact::Embedding,
        Artifact::Hypernetwork,
        Artifact::Checkpoint,
    ];

    /// The output's file name.
    pub const fn file_name(self) -> &'static str {
        match self {
            Artifact::Lora => "lora.safetensors",
            Artifact::Embedding => "embedding.safetensors",
            Artifact::DiffusersEmbedding => "learned_embeds.safetensors",
            Artifact::Hypernetwork => "hypernetwork.pt",
            Artifact::HypernetworkSafetensors => "hypernetwork.safetensors",
            Artifact::Checkpoint => "model.safetensors",
            Artifact::SchedulerConfig => "scheduler_config.json",
            Artifact::LossCurve => "loss.json",
            Artifact::Grid => "grid.png",
            Artifact::Manifest => "manifest.json",
        }
    }

    /// Its blob in `record`, if that stage produced one.
    pub fn in_record(self, record: &Record) -> Option<&BlobRef> {
        record.outputs.get(self.file_name())
    }

    /// The intermediate copies of this artifact a train stage saved (`save_every`), by step,
    /// ascending.
    pub fn snapshots(self, record: &Record) -> Vec<(u64, &BlobRef)> {
        let mut found: Vec<(u64, &BlobRef)> = record
            .outputs
            .iter()
            .filter_map(|(name, blob)| {
                let (dir, file) = name.split_once('/')?;
                let step = dir.strip_prefix("step=")?.parse().ok()?;
                (file == self.file_name()).then_some((step, blob))
            })
            .collect();
        found.sort_by_key(|(step, _)| *step);
        found
    }
}

impl Artifact {
    /// The artifact of a train stage's EMA weights (`ema_decay`), if it kept one.
    pub fn ema(self, record: &Record) -> Option<&BlobRef> {
        record.outputs.get(&ema_output(self))
    }
}

/// The output name of `kind` written from the EMA weights: `ema/<file>`.
pub fn ema_output(kind: Artifact) -> String {
    format!("ema/{}", kind.file_name())
}

/// The output name of `kind` saved after `step`: `step=N/<file>`.
pub fn snapshot_output(step: u64, kind: Artifact) -> String {
    format!("step={step}/{}", kind.file_name())
}
