//! Writing a whole SD 1.x model as one original-layout (LDM/CompVis) safetensors checkpoint,
//! the file A1111, ComfyUI and diffusers' `from_single_file` load: `model.diffusion_model.*`
//! (UNet), `first_stage_model.*` (VAE), `cond_stage_model.transformer.text_model.*` (CLIP,
//! with the `embeddings.position_ids` buffer the original files carry).
//!
//! The key mapping is the exact inverse of the reader's
//! ([`crate::diffusion::checkpoint::single_file`]): the UNet's names come from its
//! [`UNetPlan`] ([`LdmKeys`]), the VAE's from [`ldm_vae_key`], whose mid-block attention
//! projections go back to `[c, c, 1, 1]` convolutions. The file is written
//! tensor by tensor (no second copy of the model in memory), atomically, with a canonical
//! (sorted) header, so equal tensors give equal bytes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{FormatError, HostTensor, Result};
use crate::diffusion::Checkpoint;
use crate::diffusion::checkpoint::single_file::{
    CLIP_PREFIX, CONFIGS_KEY, StoredConfigs, UNET_PREFIX, VAE_PREFIX, ldm_vae_key,
};
use crate::diffusion::nn::weights::WeightStore;
use crate::diffusion::unet::{LdmKeys, UNetConfig, UNetPlan};
use crate::diffusion::vae::VaeConfig;

/// All tensors of a model under the [`WeightStore`]s' diffusers names (text encoder without
/// `text_model.`), in f32.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelTensors {
    /// UNet tensors (`down_blocks.0.resnets.0.conv1.weight`, …).
    pub unet: BTreeMap<String, HostTensor>,
    /// VAE tensors (`encoder.mid_block.attentions.0.to_q.weight` as `[c, c]`, …).
    pub vae: BTreeMap<String, HostTensor>,
    /// Text-encoder tensors (`encoder.layers.0.self_attn.q_proj.weight`, …).
    pub text_encoder: BTreeMap<String, HostTensor>,
}

/// The dtype tensors are stored in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SaveDtype {
    /// 32-bit floats (exact).
    F32,
    /// IEEE half precision (round to nearest even), the usual size for shared checkpoints.
    #[default]
    F16,
}

impl SaveDtype {
    /// `"f32"` or `"f16"`, as written in stage parameters.
    pub fn name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "f32",
            SaveDtype::F16 => "f16",
        }
    }

    fn safetensors_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "F32",
            SaveDtype::F16 => "F16",
        }
    }

    fn size(self) -> usize {
        match self {
            SaveDtype::F32 => 4,
            SaveDtype::F16 => 2,
        }
    }

    /// The value as it reads back after a round trip through this dtype.
    pub fn round(self, v: f32) -> f32 {
        match self {
            SaveDtype::F32 => v,
            SaveDtype::F16 => half::f16::from_f32(v).to_f32(),
        }
    }
}

fn read_store(ckpt: &Checkpoint, store: &WeightStore) -> Result<BTreeMap<String, HostTensor>> {
    store
        .names()
        .map(|name| {
            let (data, shape) = store
                .read(name)
                .map_err(|e| FormatError::invalid(&ckpt.path, e.to_string()))?;
            Ok((name.to_string(), HostTensor { shape, data }))
        })
        .collect()
}

impl ModelTensors {
    /// Every tensor of the checkpoint's three weight stores, converted to f32.
    pub fn read(ckpt: &Checkpoint) -> Result<Self> {
        Ok(Self {
            unet: read_store(ckpt, ckpt.unet_weights())?,
            vae: read_store(ckpt, ckpt.vae_weights())?,
            text_encoder: read_store(ckpt, ckpt.text_encoder_weights())?,
        })
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.unet.len() + self.vae.len() + self.text_encoder.len()
    }

    /// Whether there is no tensor.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        [&self.unet, &self.vae, &self.text_encoder]
            .iter()
            .flat_map(|m| m.values())
            .map(HostTensor::numel)
            .sum()
    }
}

/// One tensor of the output file: its key, stored dtype and shape, and where its values are.
enum Source<'a> {
    Floats(&'a HostTensor),
    PositionIds(usize),
}

struct Planned<'a> {
    key: String,
    dtype: &'static str,
    shape: Vec<usize>,
    source: Source<'a>,
}

impl Planned<'_> {
    fn byte_len(&self, dtype: SaveDtype) -> usize {
        match &self.source {
            Source::Floats(t) => t.numel() * dtype.size(),
            Source::PositionIds(n) => n * 8,
        }
    }
}

/// The original-layout key of every tensor, with the shape it is stored in.
fn plan<'a>(
    path: &Path,
    m: &'a ModelTensors,
    unet_cfg: &UNetConfig,
    vae_cfg: &VaeConfig,
    dtype: SaveDtype,
) -> Result<Vec<Planned<'a>>> {
    let mut out = Vec::with_capacity(m.len() + 1);
    let plan = UNetPlan::new(unet_cfg)
        .map_err(|reason| FormatError::invalid(path, format!("UNet config: {reason}")))?;
    let keys = LdmKeys::new(&plan);
    let floats = dtype.safetensors_name();
    for (name, t) in &m.unet {
        let key = keys.ldm_key(name).ok_or_else(|| {
            FormatError::invalid(
                path,
                format!("UNet tensor `{name}` has no place in the original SD 1.x layout"),
            )
        })?;
        out.push(Planned {
            key: format!("{UNET_PREFIX}{key}"),
            dtype: floats,
            shape: t.shape.clone(),
            source: Source::Floats(t),
        });
    }
    let levels = vae_cfg.block_out_channels.len();
    for (name, t) in &m.vae {
        let (key, unsqueeze) = ldm_vae_key(name, levels).ok_or_else(|| {
            FormatError::invalid(
                path,
                format!("VAE tensor `{name}` has no place in the original SD 1.x layout"),
            )
        })?;
        let mut shape = t.shape.clone();
        if unsqueeze && shape.len() == 2 {
            shape.extend([1, 1]); // linear [c, c] → 1x1 conv [c, c, 1, 1]
        }
        out.push(Planned {
            key: format!("{VAE_PREFIX}{key}"),
            dtype: floats,
            shape,
            source: Source::Floats(t),
        });
    }
    let mut positions = None;
    for (name, t) in &m.text_encoder {
        if name.ends_with("position_ids") {
            continue; // written below as the integer buffer
        }
        if name == "embeddings.position_embedding.weight" {
            positions = t.shape.first().copied();
        }
        out.push(Planned {
            key: format!("{CLIP_PREFIX}text_model.{name}"),
            dtype: floats,
            shape: t.shape.clone(),
            source: Source::Floats(t),
        });
    }
    // The original files (and A1111's loader, which loads non-strictly but warns) carry the
    // position-id buffer `[1, max_positions]` as int64 0..n.
    if let Some(n) = positions {
        out.push(Planned {
            key: format!("{CLIP_PREFIX}text_model.embeddings.position_ids"),
            dtype: "I64",
            shape: vec![1, n],
            source: Source::PositionIds(n),
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    for p in &out {
        if !seen.insert(p.key.as_str()) {
            return Err(FormatError::invalid(
                path,
                format!("two tensors map to the key `{}`", p.key),
            ));
        }
    }
    // Widest dtype first, then by key (as the safetensors crate orders them), so every tensor
    // starts aligned to its element size.
    out.sort_by(|a, b| {
        let width = |p: &Planned| if p.dtype == "I64" { 8 } else { dtype.size() };
        width(b).cmp(&width(a)).then_with(|| a.key.cmp(&b.key))
    });
    Ok(out)
}

/// Writes `m` as an original-layout single-file checkpoint at `path` (atomically: a temporary
/// sibling, then a rename), tensors in `dtype`, `metadata` as the safetensors `__metadata__`.
/// The UNet config gives `layers_per_block` and which up levels have attention, the VAE's the
/// number of levels (the decoder's are stored in reverse). The three configs are also stored in
/// the metadata under [`CONFIGS_KEY`], so that a model whose heads or groups differ from SD
/// 1.x's reloads as it was. A tensor outside the SD 1.x layout is an error naming it.
pub fn write_single_file(
    path: &Path,
    m: &ModelTensors,
    configs: &StoredConfigs,
    dtype: SaveDtype,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let planned = plan(path, m, &configs.unet, &configs.vae, dtype)?;
    let mut metadata = metadata.clone();
    metadata.insert(
        CONFIGS_KEY.to_string(),
        serde_json::to_string(configs).unwrap_or_default(),
    );
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::to_value(&metadata).unwrap_or_default(),
    );
    let mut offset = 0usize;
    for p in &planned {
        let len = p.byte_len(dtype);
        header.insert(
            p.key.clone(),
            serde_json::json!({
                "dtype": p.dtype,
                "shape": p.shape,
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    let mut text = crate::cache::canonical_json(&serde_json::Value::Object(header)).into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }

    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let io = |e: std::io::Error| FormatError::io(path, e);
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file());
        w.write_all(&(text.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&text).map_err(io)?;
        let mut buf = Vec::new();
        for p in &planned {
            buf.clear();
            match &p.source {
                Source::Floats(t) => match dtype {
                    SaveDtype::F32 => buf.extend(t.data.iter().flat_map(|v| v.to_le_bytes())),
                    SaveDtype::F16 => buf.extend(
                        t.data
                            .iter()
                            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes()),
                    ),
                },
                Source::PositionIds(n) => {
                    buf.extend((0..*n as i64).flat_map(|v| v.to_le_bytes()));
                }
            }
            w.write_all(&buf).map_err(io)?;
        }
        w.flush().map_err(io)?;
    }
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::checkpoint::single_file::vae_name;

    fn fixtures() -> &'static Path {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
    }

    /// Every key of the tiny single-file fixture maps to diffusers and back to itself.
    #[test]
    fn every_fixture_key_round_trips() {
        let file = crate::diffusion::nn::weights::SafetensorsFile::open(
            fixtures().join("tiny-sd-single-file.safetensors"),
        )
        .unwrap();
        let ckpt = Checkpoint::open(fixtures().join("tiny-sd-single-file.safetensors"))
            .unwrap()
            .with_configs_from(fixtures().join("tiny-sd"))
            .unwrap();
        let keys = LdmKeys::new(&UNetPlan::new(&ckpt.unet_config).unwrap());
        let levels = ckpt.vae_config.block_out_channels.len();
        let mut n = 0;
        for key in file.names() {
            if let Some(k) = key.strip_prefix(UNET_PREFIX) {
                let name = keys.diffusers_name(k).unwrap();
                assert_eq!(keys.ldm_key(&name).as_deref(), Some(k), "{name}");
                n += 1;
            } else if let Some(k) = key.strip_prefix(VAE_PREFIX) {
                let (name, squeeze) = vae_name(k, levels).unwrap();
                assert_eq!(ldm_vae_key(&name, levels), Some((k.to_string(), squeeze)));
                n += 1;
            }
        }
        assert!(n > 300, "{n} keys");
    }
}
