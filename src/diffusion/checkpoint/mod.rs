//! A Stable Diffusion 1.x checkpoint in either layout, and the loaded models.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dfdx::prelude::*;
use serde::de::DeserializeOwned;

pub mod single_file;

use crate::diffusion::clip::{ClipConfig, TextEncoder};
use crate::diffusion::error::{DiffusionError, Result};
use crate::diffusion::nn::elem::Elem;
use crate::diffusion::nn::weights::{Loader, SafetensorsFile, WeightStore};
use crate::diffusion::unet::{UNet, UNetConfig};
use crate::diffusion::vae::{Vae, VaeConfig};

/// How the weights are laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointLayout {
    /// A diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, …).
    Diffusers,
    /// One original LDM/CompVis `.safetensors` file.
    SingleFile,
}

/// An opened checkpoint: the configs of its three models (read or inferred; public so a
/// caller can adjust what a single file cannot tell) and their weights, memory-mapped.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The file or folder.
    pub path: PathBuf,
    /// Its layout.
    pub layout: CheckpointLayout,
    /// UNet architecture.
    pub unet_config: UNetConfig,
    /// VAE architecture.
    pub vae_config: VaeConfig,
    /// Text-encoder architecture.
    pub clip_config: ClipConfig,
    unet: WeightStore,
    vae: WeightStore,
    text_encoder: WeightStore,
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| DiffusionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| DiffusionError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The safetensors files of one diffusers component folder: `<stem>.safetensors`, its fp16
/// variant, or the shards listed in `<stem>.safetensors.index.json`.
fn component_files(dir: &Path, stem: &str) -> Result<Vec<Arc<SafetensorsFile>>> {
    for name in [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(vec![Arc::new(SafetensorsFile::open(&p)?)]);
        }
    }
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if index.is_file() {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: std::collections::BTreeMap<String, String>,
        }
        let idx: Index = read_json(&index)?;
        let shards: std::collections::BTreeSet<&String> = idx.weight_map.values().collect();
        return shards
            .into_iter()
            .map(|s| SafetensorsFile::open(dir.join(s)).map(Arc::new))
            .collect();
    }
    let reason = if dir.join(format!("{stem}.bin")).is_file() {
        format!("only {stem}.bin (PyTorch pickle) found; convert it to safetensors")
    } else {
        format!("no {stem}.safetensors")
    };
    Err(DiffusionError::Io {
        path: dir.join(format!("{stem}.safetensors")),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, reason),
    })
}

impl Checkpoint {
    /// Opens a diffusers folder or a single-file checkpoint, whichever `path` is.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            Self::open_diffusers(path)
        } else {
            Self::open_single_file(path)
        }
    }

    /// Opens a diffusers folder.
    pub fn open_diffusers(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let index: serde_json::Value = read_json(&dir.join("model_index.json"))?;
        if index.get("text_encoder_2").is_some() || index.get("unet").is_none() {
            let class = index
                .get("_class_name")
                .and_then(|v| v.as_str())
                .unwrap_or("unknown pipeline");
            return Err(DiffusionError::UnsupportedArchitecture {
                path: dir.to_path_buf(),
                found: format!("a {class} folder (second text encoder or no unet)"),
            });
        }
        let unet_config: UNetConfig = read_json(&dir.join("unet/config.json"))?;
        let vae_config: VaeConfig = read_json(&dir.join("vae/config.json"))?;
        let clip_config: ClipConfig = read_json(&dir.join("text_encoder/config.json"))?;
        let ckpt = Self {
            path: dir.to_path_buf(),
            layout: CheckpointLayout::Diffusers,
            unet: WeightStore::from_files(
                component_files(&dir.join("unet"), "diffusion_pytorch_model")?,
                "",
            ),
            vae: WeightStore::from_files(
                component_files(&dir.join("vae"), "diffusion_pytorch_model")?,
                "",
            ),
            text_encoder: WeightStore::from_files(
                component_files(&dir.join("text_encoder"), "model")?,
                "text_model.",
            ),
            unet_config,
            vae_config,
            clip_config,
        };
        ckpt.check_sd1()?;
        Ok(ckpt)
    }

    /// Opens a single-file checkpoint, inferring the architecture from its tensor shapes
    /// (see [`single_file`] for what is assumed).
    pub fn open_single_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let sf = single_file::open(path)?;
        let ckpt = Self {
            path: path.to_path_buf(),
            layout: CheckpointLayout::SingleFile,
            unet: sf.unet,
            vae: sf.vae,
            text_encoder: sf.text_encoder,
            unet_config: sf.unet_config,
            vae_config: sf.vae_config,
            clip_config: sf.clip_config,
        };
        ckpt.check_sd1()?;
        Ok(ckpt)
    }

    /// Replaces the configs with those of a diffusers folder (`unet/config.json`,
    /// `vae/config.json`, `text_encoder/config.json`), like diffusers'
    /// `from_single_file(config=…)`: for single files whose head counts or GroupNorm groups
    /// differ from SD 1.x's. The weights are unchanged; shapes are still checked on load.
    pub fn with_configs_from(mut self, diffusers_dir: impl AsRef<Path>) -> Result<Self> {
        let dir = diffusers_dir.as_ref();
        self.unet_config = read_json(&dir.join("unet/config.json"))?;
        self.vae_config = read_json(&dir.join("vae/config.json"))?;
        self.clip_config = read_json(&dir.join("text_encoder/config.json"))?;
        self.check_sd1()?;
        Ok(self)
    }

    /// Rejects SD 2.x / SDXL configurations with a message saying what was found.
    fn check_sd1(&self) -> Result<()> {
        let err = |found: String| DiffusionError::UnsupportedArchitecture {
            path: self.path.clone(),
            found,
        };
        let u = &self.unet_config;
        if let Some(a) = &u.addition_embed_type {
            return Err(err(format!("UNet addition_embed_type `{a}` (SDXL)")));
        }
        if u.cross_attention_dim == 1024 {
            return Err(err("UNet cross_attention_dim 1024 (SD 2.x)".into()));
        }
        if u.cross_attention_dim != self.clip_config.hidden_size {
            return Err(err(format!(
                "UNet cross_attention_dim {} but a {}-wide text encoder",
                u.cross_attention_dim, self.clip_config.hidden_size
            )));
        }
        if let Err(reason) = u.validate() {
            return Err(err(format!("UNet config: {reason}")));
        }
        Ok(())
    }

    /// The three configs, as a single file stores them.
    pub fn configs(&self) -> single_file::StoredConfigs {
        single_file::StoredConfigs {
            unet: self.unet_config.clone(),
            vae: self.vae_config.clone(),
            text_encoder: self.clip_config.clone(),
        }
    }

    /// The UNet's tensors under diffusers names.
    pub fn unet_weights(&self) -> &WeightStore {
        &self.unet
    }

    /// The VAE's tensors under diffusers names.
    pub fn vae_weights(&self) -> &WeightStore {
        &self.vae
    }

    /// The text encoder's tensors under transformers names without `text_model.`.
    pub fn text_encoder_weights(&self) -> &WeightStore {
        &self.text_encoder
    }

    /// Builds the UNet on `dev` computing in `E` (f32 or [`crate::diffusion::nn::Half`]).
    pub fn load_unet_as<E: Elem, D: Device<E>>(&self, dev: &D) -> Result<UNet<D, E>> {
        UNet::load(&Loader::new(&self.unet, dev), &self.unet_config)
    }

    /// Builds the UNet on `dev` (f32).
    pub fn load_unet<D: Device<f32>>(&self, dev: &D) -> Result<UNet<D>> {
        UNet::load(&Loader::new(&self.unet, dev), &self.unet_config)
    }

    /// Builds the VAE on `dev`.
    pub fn load_vae<D: Device<f32>>(&self, dev: &D) -> Result<Vae<D>> {
        Vae::load(&Loader::new(&self.vae, dev), &self.vae_config)
    }

    /// Builds the text encoder on `dev`.
    pub fn load_text_encoder<D: Device<f32>>(&self, dev: &D) -> Result<TextEncoder<D>> {
        TextEncoder::load(&Loader::new(&self.text_encoder, dev), &self.clip_config)
    }

    /// Builds all three models on `dev` (f32).
    pub fn load<D: Device<f32>>(&self, dev: &D) -> Result<StableDiffusion<D>> {
        self.load_as(dev)
    }

    /// Builds all three models on `dev`, the UNet computing in `E` (the text encoder and the
    /// VAE always compute in f32).
    pub fn load_as<E: Elem, D: Device<f32> + Device<E>>(
        &self,
        dev: &D,
    ) -> Result<StableDiffusion<D, E>> {
        Ok(StableDiffusion {
            text_encoders: vec![self.load_text_encoder(dev)?],
            unet: self.load_unet_as(dev)?,
            vae: self.load_vae(dev)?,
        })
    }
}

/// The models of a checkpoint (configs in each model's `config` field): its text encoders, the
/// UNet and the VAE.
#[derive(Debug, Clone)]
pub struct StableDiffusion<D: Storage<f32> + Storage<E>, E = f32> {
    /// The text encoders, in the order a family concatenates their hidden states (SDXL: CLIP
    /// ViT-L, then OpenCLIP ViT-bigG). Never empty: loading builds one per encoder the family
    /// has, one CLIP ViT-L for SD 1.x, and families with more are refused when the checkpoint
    /// is opened until text-to-image and training use them all. The first is the
    /// one kohya's `lora_te_` modules, textual-inversion vectors and clip skip address.
    pub text_encoders: Vec<TextEncoder<D>>,
    /// Noise-predicting UNet (computing in `E`).
    pub unet: UNet<D, E>,
    /// KL autoencoder.
    pub vae: Vae<D>,
}

impl<D: Storage<f32> + Storage<E>, E> StableDiffusion<D, E> {
    /// The first text encoder (for SD 1.x the only one).
    pub fn text_encoder(&self) -> &TextEncoder<D> {
        &self.text_encoders[0]
    }

    /// The first text encoder, mutably.
    pub fn text_encoder_mut(&mut self) -> &mut TextEncoder<D> {
        &mut self.text_encoders[0]
    }
}

impl<D: Device<f32>> StableDiffusion<D> {
    /// Opens `path` (diffusers folder or single file) and builds the models on `dev`.
    pub fn load(path: impl AsRef<Path>, dev: &D) -> Result<Self> {
        Checkpoint::open(path)?.load(dev)
    }
}
