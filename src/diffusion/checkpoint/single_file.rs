//! The original (LDM/CompVis) single-file SD 1.x checkpoint: `model.diffusion_model.*` (UNet),
//! `first_stage_model.*` (VAE), `cond_stage_model.transformer.*` (CLIP), mapped to diffusers
//! names, with the architecture inferred from tensor shapes.
//!
//! What the shapes cannot tell is filled with SD 1.x's values: 8 attention heads per UNet
//! transformer, CLIP heads of width 64, 32 GroupNorm groups. A checkpoint that differs (like the
//! tiny test models) needs its diffusers configs, see
//! [`super::Checkpoint::with_configs_from`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use crate::diffusion::clip::ClipConfig;
use crate::diffusion::error::{DiffusionError, Result};
use crate::diffusion::nn::weights::{SafetensorsFile, WeightStore};
use crate::diffusion::unet::{LdmKeys, PerLevel, UNetConfig, UNetPlan};
use crate::diffusion::vae::VaeConfig;

/// Key prefix of the UNet.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Key prefix of the VAE.
pub const VAE_PREFIX: &str = "first_stage_model.";
/// Key prefix of the CLIP text encoder (followed by `text_model.` in recent files).
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";

/// `__metadata__` key under which sdpipe stores the three models' diffusers configs (JSON
/// `{"unet": …, "vae": …, "text_encoder": …}`), so that a file whose head counts, GroupNorm
/// groups or latent scaling differ from SD 1.x's (like sdpipe's pretrained world model) loads
/// without a config folder. Other tools ignore it.
pub const CONFIGS_KEY: &str = "sdpipe_configs";

/// The configs stored under [`CONFIGS_KEY`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredConfigs {
    /// UNet config.
    pub unet: UNetConfig,
    /// VAE config.
    pub vae: VaeConfig,
    /// Text-encoder config.
    pub text_encoder: ClipConfig,
}

/// The three components of a single-file checkpoint, under diffusers names, with configs.
#[derive(Debug, Clone)]
pub struct SingleFile {
    /// UNet tensors.
    pub unet: WeightStore,
    /// VAE tensors.
    pub vae: WeightStore,
    /// Text-encoder tensors (names without `text_model.`).
    pub text_encoder: WeightStore,
    /// Inferred UNet architecture.
    pub unet_config: UNetConfig,
    /// Inferred VAE architecture.
    pub vae_config: VaeConfig,
    /// Inferred text-encoder architecture.
    pub clip_config: ClipConfig,
}

/// Opens and maps a single-file checkpoint.
pub fn open(path: &Path) -> Result<SingleFile> {
    let file = Arc::new(SafetensorsFile::open(path)?);
    let names = file.names();
    check_supported(path, &file, &names)?;
    let shapes: BTreeMap<String, Vec<usize>> = names
        .iter()
        .filter_map(|n| file.shape(n).map(|s| (n.clone(), s)))
        .collect();

    let unet_keys: BTreeMap<&str, &Vec<usize>> = shapes
        .iter()
        .filter_map(|(k, s)| k.strip_prefix(UNET_PREFIX).map(|r| (r, s)))
        .collect();
    let vae_keys: BTreeMap<&str, &Vec<usize>> = shapes
        .iter()
        .filter_map(|(k, s)| k.strip_prefix(VAE_PREFIX).map(|r| (r, s)))
        .collect();
    let clip_keys: BTreeMap<String, &Vec<usize>> = shapes
        .iter()
        .filter_map(|(k, s)| {
            let rest = k.strip_prefix(CLIP_PREFIX)?;
            let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
            (!rest.ends_with("position_ids")).then(|| (rest.to_string(), s))
        })
        .collect();

    let (unet_config, vae_config, clip_config) =
        match file.user_metadata().and_then(|m| m.get(CONFIGS_KEY)) {
            Some(text) => {
                let stored: StoredConfigs =
                    serde_json::from_str(text).map_err(|e| DiffusionError::Config {
                        path: path.to_path_buf(),
                        reason: format!("metadata `{CONFIGS_KEY}`: {e}"),
                    })?;
                (stored.unet, stored.vae, stored.text_encoder)
            }
            None => (
                infer_unet(path, &unet_keys)?,
                infer_vae(path, &vae_keys)?,
                infer_clip(path, &clip_keys)?,
            ),
        };

    let plan = UNetPlan::new(&unet_config).map_err(|reason| DiffusionError::Config {
        path: path.to_path_buf(),
        reason: format!("UNet: {reason}"),
    })?;
    let ldm_keys = LdmKeys::new(&plan);
    let mut unet = WeightStore::with_files(vec![file.clone()]);
    for key in unet_keys.keys() {
        if let Some(name) = ldm_keys.diffusers_name(key) {
            unet.insert(name, 0, format!("{UNET_PREFIX}{key}"), false);
        }
    }
    let levels = vae_config.block_out_channels.len();
    let mut vae = WeightStore::with_files(vec![file.clone()]);
    for key in vae_keys.keys() {
        if let Some((name, squeeze)) = vae_name(key, levels) {
            vae.insert(name, 0, format!("{VAE_PREFIX}{key}"), squeeze);
        }
    }
    let mut text_encoder = WeightStore::with_files(vec![file.clone()]);
    for key in names.iter().filter(|k| k.starts_with(CLIP_PREFIX)) {
        let rest = &key[CLIP_PREFIX.len()..];
        let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
        if !rest.ends_with("position_ids") {
            text_encoder.insert(rest.to_string(), 0, key.clone(), false);
        }
    }
    Ok(SingleFile {
        unet,
        vae,
        text_encoder,
        unet_config,
        vae_config,
        clip_config,
    })
}

fn unsupported(path: &Path, found: impl Into<String>) -> DiffusionError {
    DiffusionError::UnsupportedArchitecture {
        path: path.to_path_buf(),
        found: found.into(),
    }
}

/// Rejects SD 2.x, SDXL and files that are not SD checkpoints, saying what was found.
fn check_supported(path: &Path, file: &SafetensorsFile, names: &[String]) -> Result<()> {
    if names.iter().any(|n| n.starts_with("conditioner.")) {
        return Err(unsupported(
            path,
            "`conditioner.*` keys (SDXL's dual text encoders)",
        ));
    }
    if names
        .iter()
        .any(|n| n.starts_with("model.diffusion_model.label_emb."))
    {
        return Err(unsupported(
            path,
            "`model.diffusion_model.label_emb.*` (SDXL-style added embedding)",
        ));
    }
    if names
        .iter()
        .any(|n| n.starts_with("cond_stage_model.model."))
    {
        return Err(unsupported(
            path,
            "`cond_stage_model.model.*` keys (SD 2.x's OpenCLIP ViT-H text encoder)",
        ));
    }
    if !names.iter().any(|n| n.starts_with(UNET_PREFIX)) {
        return Err(unsupported(
            path,
            "no `model.diffusion_model.*` tensors: not a Stable Diffusion checkpoint (or a UNet-only / LoRA file)",
        ));
    }
    if !names.iter().any(|n| n.starts_with(VAE_PREFIX)) {
        return Err(unsupported(path, "no `first_stage_model.*` (VAE) tensors"));
    }
    if !names.iter().any(|n| n.starts_with(CLIP_PREFIX)) {
        return Err(unsupported(
            path,
            "no `cond_stage_model.transformer.*` (CLIP text encoder) tensors",
        ));
    }
    if let Some((name, shape)) = names
        .iter()
        .filter(|n| n.starts_with(UNET_PREFIX) && n.ends_with("attn2.to_k.weight"))
        .find_map(|n| file.shape(n).map(|s| (n, s)))
        && shape.get(1) == Some(&1024)
    {
        return Err(unsupported(
            path,
            format!("cross-attention context width 1024 in `{name}` (SD 2.x)"),
        ));
    }
    Ok(())
}

/// Distinct values of the numeric path segment after `prefix` among `keys`.
fn indices<'a, K: AsRef<str> + 'a>(
    keys: impl Iterator<Item = &'a K>,
    prefix: &str,
) -> BTreeSet<usize> {
    keys.filter_map(|k| {
        let rest = k.as_ref().strip_prefix(prefix)?;
        rest.split('.').next()?.parse().ok()
    })
    .collect()
}

fn shape_of<'a>(
    path: &Path,
    keys: &BTreeMap<&str, &'a Vec<usize>>,
    prefix: &str,
    key: &str,
    rank: usize,
) -> Result<&'a Vec<usize>> {
    match keys.get(key) {
        Some(s) if s.len() == rank => Ok(s),
        Some(s) => Err(DiffusionError::ShapeMismatch {
            name: format!("{prefix}{key}"),
            source_desc: path.display().to_string(),
            expected: vec![0; rank],
            found: s.to_vec(),
        }),
        None => Err(DiffusionError::MissingTensor {
            name: format!("{prefix}{key}"),
            source_desc: path.display().to_string(),
        }),
    }
}

fn infer_unet(path: &Path, keys: &BTreeMap<&str, &Vec<usize>>) -> Result<UNetConfig> {
    let p = UNET_PREFIX;
    let conv_in = shape_of(path, keys, p, "input_blocks.0.0.weight", 4)?;
    let conv_out = shape_of(path, keys, p, "out.2.weight", 4)?;
    let ops = keys
        .keys()
        .filter(|k| k.starts_with("input_blocks.") && k.contains(".0.op.weight"))
        .count();
    let levels = ops + 1;
    let outputs = indices(keys.keys(), "output_blocks.").len();
    if outputs == 0 || outputs % levels != 0 || outputs / levels < 2 {
        return Err(DiffusionError::Config {
            path: path.to_path_buf(),
            reason: format!(
                "cannot infer the UNet layout: {levels} levels but {outputs} output blocks"
            ),
        });
    }
    let layers = outputs / levels - 1;
    let mut block_out_channels = Vec::with_capacity(levels);
    let mut down_block_types = Vec::with_capacity(levels);
    let mut context_dim = None;
    let mut linear_proj = false;
    let mut transformer_layers = 1;
    for i in 0..levels {
        let k = (layers + 1) * i + 1;
        let res = shape_of(
            path,
            keys,
            p,
            &format!("input_blocks.{k}.0.out_layers.3.weight"),
            4,
        )?;
        block_out_channels.push(res[0]);
        let proj_in = format!("input_blocks.{k}.1.proj_in.weight");
        if let Some(s) = keys.get(proj_in.as_str()) {
            down_block_types.push("CrossAttnDownBlock2D".to_string());
            linear_proj = s.len() == 2;
            let ctx = shape_of(
                path,
                keys,
                p,
                &format!("input_blocks.{k}.1.transformer_blocks.0.attn2.to_k.weight"),
                2,
            )?;
            context_dim = Some(ctx[1]);
            transformer_layers = indices(
                keys.keys(),
                &format!("input_blocks.{k}.1.transformer_blocks."),
            )
            .len();
        } else {
            down_block_types.push("DownBlock2D".to_string());
        }
    }
    let up_block_types = down_block_types
        .iter()
        .rev()
        .map(|t| t.replace("Down", "Up"))
        .collect();
    let cross_attention_dim = match context_dim {
        Some(c) => c,
        None => shape_of(
            path,
            keys,
            p,
            "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            2,
        )?[1],
    };
    Ok(UNetConfig {
        in_channels: conv_in[1],
        out_channels: conv_out[0],
        block_out_channels,
        down_block_types,
        up_block_types,
        layers_per_block: layers,
        attention_head_dim: PerLevel::One(8),
        num_attention_heads: None,
        cross_attention_dim,
        use_linear_projection: linear_proj,
        transformer_layers_per_block: PerLevel::One(transformer_layers.max(1)),
        ..UNetConfig::default()
    })
}

fn infer_vae(path: &Path, keys: &BTreeMap<&str, &Vec<usize>>) -> Result<VaeConfig> {
    let p = VAE_PREFIX;
    let levels = indices(keys.keys(), "encoder.down.").len();
    if levels == 0 {
        return Err(DiffusionError::MissingTensor {
            name: format!("{p}encoder.down.0.block.0.conv1.weight"),
            source_desc: path.display().to_string(),
        });
    }
    let mut block_out_channels = Vec::with_capacity(levels);
    for i in 0..levels {
        block_out_channels.push(
            shape_of(
                path,
                keys,
                p,
                &format!("encoder.down.{i}.block.0.conv1.weight"),
                4,
            )?[0],
        );
    }
    let layers = indices(keys.keys(), "encoder.down.0.block.").len();
    Ok(VaeConfig {
        in_channels: shape_of(path, keys, p, "encoder.conv_in.weight", 4)?[1],
        out_channels: shape_of(path, keys, p, "decoder.conv_out.weight", 4)?[0],
        latent_channels: shape_of(path, keys, p, "decoder.conv_in.weight", 4)?[1],
        block_out_channels,
        layers_per_block: layers,
        mid_block_add_attention: keys.contains_key("encoder.mid.attn_1.q.weight"),
        use_quant_conv: keys.contains_key("quant_conv.weight"),
        use_post_quant_conv: keys.contains_key("post_quant_conv.weight"),
        ..VaeConfig::default()
    })
}

fn infer_clip(path: &Path, keys: &BTreeMap<String, &Vec<usize>>) -> Result<ClipConfig> {
    let get = |key: &str| -> Result<&Vec<usize>> {
        keys.get(key)
            .copied()
            .ok_or_else(|| DiffusionError::MissingTensor {
                name: format!("{CLIP_PREFIX}text_model.{key}"),
                source_desc: path.display().to_string(),
            })
    };
    let tok = get("embeddings.token_embedding.weight")?;
    let pos = get("embeddings.position_embedding.weight")?;
    let fc1 = get("encoder.layers.0.mlp.fc1.weight")?;
    let hidden = tok[1];
    Ok(ClipConfig {
        vocab_size: tok[0],
        hidden_size: hidden,
        intermediate_size: fc1[0],
        num_hidden_layers: indices(keys.keys(), "encoder.layers.").len(),
        // CLIP ViT-L/14 heads are 64 wide
        num_attention_heads: if hidden % 64 == 0 { hidden / 64 } else { 1 },
        max_position_embeddings: pos[0],
        ..ClipConfig::default()
    })
}

/// The diffusers name of a VAE key (without prefix) for `levels` levels, and whether the file
/// stores it as a 1x1 conv that diffusers holds as a linear weight.
pub fn vae_name(key: &str, levels: usize) -> Option<(String, bool)> {
    let resnet = |r: &str| -> String {
        match r.strip_prefix("nin_shortcut.") {
            Some(r) => format!("conv_shortcut.{r}"),
            None => r.to_string(),
        }
    };
    for part in ["encoder", "decoder"] {
        let Some(rest) = key.strip_prefix(part).and_then(|r| r.strip_prefix('.')) else {
            continue;
        };
        if let Some(r) = rest.strip_prefix("norm_out.") {
            return Some((format!("{part}.conv_norm_out.{r}"), false));
        }
        if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
            return Some((format!("{part}.{rest}"), false));
        }
        if let Some(r) = rest.strip_prefix("mid.block_1.") {
            return Some((format!("{part}.mid_block.resnets.0.{}", resnet(r)), false));
        }
        if let Some(r) = rest.strip_prefix("mid.block_2.") {
            return Some((format!("{part}.mid_block.resnets.1.{}", resnet(r)), false));
        }
        if let Some(r) = rest.strip_prefix("mid.attn_1.") {
            let (module, param) = r.split_once('.')?;
            let target = match module {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            let squeeze = module != "norm" && param == "weight";
            return Some((
                format!("{part}.mid_block.attentions.0.{target}.{param}"),
                squeeze,
            ));
        }
        let (block_kind, level_rest) = if part == "encoder" {
            ("down", rest.strip_prefix("down.")?)
        } else {
            ("up", rest.strip_prefix("up.")?)
        };
        let (idx, r) = level_rest.split_once('.')?;
        let idx: usize = idx.parse().ok()?;
        // the decoder's levels are stored in reverse
        let level = if part == "decoder" {
            levels.checked_sub(1 + idx)?
        } else {
            idx
        };
        if let Some(r) = r.strip_prefix("block.") {
            let (j, r) = r.split_once('.')?;
            return Some((
                format!(
                    "{part}.{block_kind}_blocks.{level}.resnets.{j}.{}",
                    resnet(r)
                ),
                false,
            ));
        }
        if let Some(r) = r.strip_prefix("downsample.") {
            return Some((
                format!("{part}.down_blocks.{level}.downsamplers.0.{r}"),
                false,
            ));
        }
        if let Some(r) = r.strip_prefix("upsample.") {
            return Some((format!("{part}.up_blocks.{level}.upsamplers.0.{r}"), false));
        }
        return None;
    }
    if key.starts_with("quant_conv.") || key.starts_with("post_quant_conv.") {
        return Some((key.to_string(), false));
    }
    None
}

/// Splits `"3.rest"` into `(3, "rest")`.
fn one_index(s: &str) -> Option<(usize, &str)> {
    let (a, r) = s.split_once('.')?;
    Some((a.parse().ok()?, r))
}

/// The original (LDM) key, without [`VAE_PREFIX`], of a diffusers VAE tensor name for `levels`
/// levels, and whether the original stores it as a 1x1 conv (`[c, c, 1, 1]`) where diffusers
/// holds a linear weight (the mid-block attention projections): the inverse of [`vae_name`].
pub fn ldm_vae_key(name: &str, levels: usize) -> Option<(String, bool)> {
    let resnet = |r: &str| -> String {
        match r.strip_prefix("conv_shortcut.") {
            Some(r) => format!("nin_shortcut.{r}"),
            None => r.to_string(),
        }
    };
    if name.starts_with("quant_conv.") || name.starts_with("post_quant_conv.") {
        return Some((name.to_string(), false));
    }
    for part in ["encoder", "decoder"] {
        let Some(rest) = name.strip_prefix(part).and_then(|r| r.strip_prefix('.')) else {
            continue;
        };
        if let Some(r) = rest.strip_prefix("conv_norm_out.") {
            return Some((format!("{part}.norm_out.{r}"), false));
        }
        if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
            return Some((format!("{part}.{rest}"), false));
        }
        if let Some(r) = rest.strip_prefix("mid_block.resnets.0.") {
            return Some((format!("{part}.mid.block_1.{}", resnet(r)), false));
        }
        if let Some(r) = rest.strip_prefix("mid_block.resnets.1.") {
            return Some((format!("{part}.mid.block_2.{}", resnet(r)), false));
        }
        if let Some(r) = rest.strip_prefix("mid_block.attentions.0.") {
            let (module, param) = r.rsplit_once('.')?;
            let target = match module {
                "group_norm" => "norm",
                "to_q" => "q",
                "to_k" => "k",
                "to_v" => "v",
                "to_out.0" => "proj_out",
                _ => return None,
            };
            let unsqueeze = module != "group_norm" && param == "weight";
            return Some((format!("{part}.mid.attn_1.{target}.{param}"), unsqueeze));
        }
        let (kind, ldm) = if part == "encoder" {
            ("down_blocks.", "down")
        } else {
            ("up_blocks.", "up")
        };
        let (level, r) = rest.strip_prefix(kind).and_then(one_index)?;
        if level >= levels {
            return None;
        }
        // the decoder's levels are stored in reverse
        let idx = if part == "decoder" {
            levels - 1 - level
        } else {
            level
        };
        if let Some((j, r)) = r.strip_prefix("resnets.").and_then(one_index) {
            return Some((format!("{part}.{ldm}.{idx}.block.{j}.{}", resnet(r)), false));
        }
        if let Some(r) = r.strip_prefix("downsamplers.0.") {
            return Some((format!("{part}.{ldm}.{idx}.downsample.{r}"), false));
        }
        if let Some(r) = r.strip_prefix("upsamplers.0.") {
            return Some((format!("{part}.{ldm}.{idx}.upsample.{r}"), false));
        }
        return None;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SD 1.5's layout (2 ResNets per level, 4 levels, no attention on the last).
    #[test]
    fn sd15_unet_keys_map_to_diffusers() {
        let cases = [
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("input_blocks.0.0.bias", "conv_in.bias"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.1.proj_in.weight",
                "down_blocks.0.attentions.1.proj_in.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.weight",
                "down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight",
                "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "input_blocks.11.0.emb_layers.1.bias",
                "down_blocks.3.resnets.1.time_emb_proj.bias",
            ),
            (
                "middle_block.0.out_layers.3.weight",
                "mid_block.resnets.0.conv2.weight",
            ),
            (
                "middle_block.1.norm.weight",
                "mid_block.attentions.0.norm.weight",
            ),
            (
                "middle_block.2.in_layers.2.weight",
                "mid_block.resnets.1.conv1.weight",
            ),
            (
                "output_blocks.0.0.in_layers.2.weight",
                "up_blocks.0.resnets.0.conv1.weight",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.3.1.proj_out.bias",
                "up_blocks.1.attentions.0.proj_out.bias",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight",
                "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2.weight",
            ),
            ("out.0.weight", "conv_norm_out.weight"),
            ("out.2.bias", "conv_out.bias"),
        ];
        let keys = LdmKeys::new(&UNetPlan::new(&UNetConfig::default()).unwrap());
        for (ldm, diffusers) in cases {
            assert_eq!(
                keys.diffusers_name(ldm).as_deref(),
                Some(diffusers),
                "{ldm}"
            );
            assert_eq!(keys.ldm_key(diffusers).as_deref(), Some(ldm), "{diffusers}");
        }
        assert_eq!(keys.ldm_key("down_blocks.0.resnets.2.conv1.weight"), None);
        assert_eq!(keys.ldm_key("up_blocks.9.upsamplers.0.conv.weight"), None);
    }

    /// Every key of SD 1.5's original UNet and VAE (as in `v1-5-pruned-emaonly`), generated
    /// from its layout: each maps to a distinct diffusers name and back to itself.
    #[test]
    fn every_sd15_key_round_trips() {
        let w = |p: String| [format!("{p}.weight"), format!("{p}.bias")];
        let resnet = |p: &str, skip: bool| {
            let mut v: Vec<String> = [
                "in_layers.0",
                "in_layers.2",
                "emb_layers.1",
                "out_layers.0",
                "out_layers.3",
            ]
            .iter()
            .flat_map(|m| w(format!("{p}.{m}")))
            .collect();
            if skip {
                v.extend(w(format!("{p}.skip_connection")));
            }
            v
        };
        let attention = |p: &str| {
            let mut v: Vec<String> = ["norm", "proj_in", "proj_out"]
                .iter()
                .flat_map(|m| w(format!("{p}.{m}")))
                .collect();
            let t = format!("{p}.transformer_blocks.0");
            for m in ["attn1", "attn2"] {
                for q in ["to_q", "to_k", "to_v"] {
                    v.push(format!("{t}.{m}.{q}.weight"));
                }
                v.extend(w(format!("{t}.{m}.to_out.0")));
            }
            for m in ["ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3"] {
                v.extend(w(format!("{t}.{m}")));
            }
            v
        };
        let mut unet: Vec<String> = [
            "time_embed.0",
            "time_embed.2",
            "out.0",
            "out.2",
            "input_blocks.0.0",
        ]
        .iter()
        .flat_map(|m| w(m.to_string()))
        .collect();
        for i in 0..4 {
            for j in 0..2 {
                let k = 1 + 3 * i + j;
                // 320→640 and 640→1280 need a skip projection, 1280→1280 not
                unet.extend(resnet(
                    &format!("input_blocks.{k}.0"),
                    (i == 1 || i == 2) && j == 0,
                ));
                if i < 3 {
                    unet.extend(attention(&format!("input_blocks.{k}.1")));
                }
            }
            if i < 3 {
                unet.extend(w(format!("input_blocks.{}.0.op", 3 + 3 * i)));
            }
        }
        unet.extend(resnet("middle_block.0", false));
        unet.extend(attention("middle_block.1"));
        unet.extend(resnet("middle_block.2", false));
        for i in 0..4 {
            for j in 0..3 {
                let k = 3 * i + j;
                unet.extend(resnet(&format!("output_blocks.{k}.0"), true));
                if i > 0 {
                    unet.extend(attention(&format!("output_blocks.{k}.1")));
                }
                if i < 3 && j == 2 {
                    let m = if i > 0 { 2 } else { 1 };
                    unet.extend(w(format!("output_blocks.{k}.{m}.conv")));
                }
            }
        }
        assert_eq!(unet.len(), 686, "SD 1.5's UNet has 686 tensors");
        let keys = LdmKeys::new(&UNetPlan::new(&UNetConfig::default()).unwrap());
        let mut names = BTreeSet::new();
        for key in &unet {
            let name = (keys.diffusers_name(key)).unwrap_or_else(|| panic!("{key} unmapped"));
            assert_eq!(keys.ldm_key(&name).as_ref(), Some(key), "{name}");
            assert!(names.insert(name.clone()), "{name} twice");
        }

        let mut vae: Vec<String> = ["quant_conv", "post_quant_conv"]
            .iter()
            .flat_map(|m| w(m.to_string()))
            .collect();
        let vae_resnet = |p: String, skip: bool| {
            let mut v: Vec<String> = ["norm1", "conv1", "norm2", "conv2"]
                .iter()
                .flat_map(|m| w(format!("{p}.{m}")))
                .collect();
            if skip {
                v.extend(w(format!("{p}.nin_shortcut")));
            }
            v
        };
        for part in ["encoder", "decoder"] {
            for m in ["conv_in", "conv_out", "norm_out"] {
                vae.extend(w(format!("{part}.{m}")));
            }
            vae.extend(vae_resnet(format!("{part}.mid.block_1"), false));
            vae.extend(vae_resnet(format!("{part}.mid.block_2"), false));
            for m in ["norm", "q", "k", "v", "proj_out"] {
                vae.extend(w(format!("{part}.mid.attn_1.{m}")));
            }
        }
        for i in 0..4 {
            for j in 0..2 {
                vae.extend(vae_resnet(
                    format!("encoder.down.{i}.block.{j}"),
                    j == 0 && (i == 1 || i == 2),
                ));
            }
            if i < 3 {
                vae.extend(w(format!("encoder.down.{i}.downsample.conv")));
            }
            for j in 0..3 {
                vae.extend(vae_resnet(
                    format!("decoder.up.{i}.block.{j}"),
                    j == 0 && (i == 0 || i == 1),
                ));
            }
            if i > 0 {
                vae.extend(w(format!("decoder.up.{i}.upsample.conv")));
            }
        }
        assert_eq!(vae.len(), 248, "SD 1.5's VAE has 248 tensors");
        let mut names = BTreeSet::new();
        for key in &vae {
            let (name, squeeze) = vae_name(key, 4).unwrap_or_else(|| panic!("{key} unmapped"));
            assert_eq!(
                ldm_vae_key(&name, 4),
                Some((key.clone(), squeeze)),
                "{name}"
            );
            assert!(names.insert(name.clone()), "{name} twice");
        }
    }

    #[test]
    fn sd15_vae_keys_map_to_diffusers() {
        let cases = [
            (
                "encoder.down.3.block.1.norm2.weight",
                "encoder.down_blocks.3.resnets.1.norm2.weight",
                false,
            ),
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                false,
            ),
            (
                "encoder.down.2.downsample.conv.weight",
                "encoder.down_blocks.2.downsamplers.0.conv.weight",
                false,
            ),
            (
                "decoder.up.3.block.0.conv1.weight",
                "decoder.up_blocks.0.resnets.0.conv1.weight",
                false,
            ),
            (
                "decoder.up.0.block.2.conv2.bias",
                "decoder.up_blocks.3.resnets.2.conv2.bias",
                false,
            ),
            (
                "decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                false,
            ),
            (
                "decoder.mid.attn_1.proj_out.weight",
                "decoder.mid_block.attentions.0.to_out.0.weight",
                true,
            ),
            (
                "decoder.mid.attn_1.q.bias",
                "decoder.mid_block.attentions.0.to_q.bias",
                false,
            ),
            (
                "encoder.mid.attn_1.norm.weight",
                "encoder.mid_block.attentions.0.group_norm.weight",
                false,
            ),
            (
                "encoder.mid.block_2.conv1.weight",
                "encoder.mid_block.resnets.1.conv1.weight",
                false,
            ),
            ("encoder.norm_out.bias", "encoder.conv_norm_out.bias", false),
            ("post_quant_conv.weight", "post_quant_conv.weight", false),
        ];
        for (ldm, diffusers, squeeze) in cases {
            assert_eq!(
                vae_name(ldm, 4),
                Some((diffusers.to_string(), squeeze)),
                "{ldm}"
            );
            assert_eq!(
                ldm_vae_key(diffusers, 4),
                Some((ldm.to_string(), squeeze)),
                "{diffusers}"
            );
        }
        assert_eq!(
            ldm_vae_key("encoder.down_blocks.4.resnets.0.conv1.weight", 4),
            None
        );
        assert_eq!(vae_name("loss.logvar", 4), None);
    }
}
