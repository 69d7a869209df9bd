//! What model stages share: opening the base checkpoint and hashing the parts they read.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;

use crate::cache::FileHasher;
use crate::diffusion::Checkpoint;
use crate::settings::PipelineSettings;

/// A model component a stage reads.
#[derive(Debug, Clone, Copy)]
pub enum Component {
    /// The VAE.
    Vae,
    /// The UNet.
    Unet,
    /// The text encoder (and tokenizer).
    TextEncoder,
}

impl Component {
    fn folder(self) -> &'static str {
        match self {
            Component::Vae => "vae",
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
        }
    }
}

/// Opens `[pipeline] base_model` (with `model_config` if set).
pub fn open_checkpoint(settings: &PipelineSettings) -> anyhow::Result<Checkpoint> {
    let path = settings
        .base_model
        .as_ref()
        .context("[pipeline] has no base_model")?;
    let mut ckpt = Checkpoint::open(path)
        .with_context(|| format!("cannot open base model {}", path.display()))?;
    if let Some(dir) = &settings.model_config {
        ckpt = ckpt
            .with_configs_from(dir)
            .with_context(|| format!("cannot read model configs from {}", dir.display()))?;
    }
    Ok(ckpt)
}

/// Hashes of the files the given components are read from: the whole single file, or the
/// component folders of a diffusers model (and the override configs).
pub fn model_inputs(
    settings: &PipelineSettings,
    hasher: &FileHasher,
    components: &[Component],
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut inputs = BTreeMap::new();
    let Some(path) = &settings.base_model else {
        return Ok(inputs);
    };
    let hash = |p: &Path| {
        hasher
            .hash_file(p)
            .with_context(|| format!("cannot read {}", p.display()))
    };
    if path.is_file() {
        inputs.insert("base_model".to_string(), hash(path)?);
    } else {
        for c in components {
            hash_folder(
                &path.join(c.folder()),
                &format!("base_model/{}", c.folder()),
                &hash,
                &mut inputs,
            )?;
            if matches!(c, Component::TextEncoder) {
                hash_folder(
                    &path.join("tokenizer"),
                    "base_model/tokenizer",
                    &hash,
                    &mut inputs,
                )?;
            }
        }
        let scheduler = path.join("scheduler/scheduler_config.json");
        if scheduler.is_file() {
            inputs.insert(
                "base_model/scheduler/scheduler_config.json".into(),
                hash(&scheduler)?,
            );
        }
    }
    if let Some(dir) = &settings.model_config {
        for c in components {
            let config = dir.join(c.folder()).join("config.json");
            if config.is_file() {
                inputs.insert(
                    format!("model_config/{}/config.json", c.folder()),
                    hash(&config)?,
                );
            }
        }
    }
    Ok(inputs)
}

fn hash_folder(
    dir: &Path,
    prefix: &str,
    hash: &dyn Fn(&Path) -> anyhow::Result<String>,
    into: &mut BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_file() {
            let name = e.file_name().to_string_lossy().into_owned();
            into.insert(format!("{prefix}/{name}"), hash(&p)?);
        }
    }
    Ok(())
}
