//! The UNet's configuration: diffusers' `config.json` fields for `UNet2DConditionModel`, with
//! SD 1.5's values as defaults, and the check that this code implements what it describes.

use serde::{Deserialize, Serialize};

/// A config value given once for every level or once per level.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PerLevel {
    /// The same value on every level.
    One(usize),
    /// One value per level (down-block order).
    Each(Vec<usize>),
}

impl PerLevel {
    /// The value of level `i`.
    pub fn get(&self, i: usize) -> Option<usize> {
        match self {
            PerLevel::One(v) => Some(*v),
            PerLevel::Each(v) => v.get(i).copied(),
        }
    }
}

/// UNet configuration (diffusers `config.json` fields). Defaults are SD 1.5's.
///
/// `attention_head_dim` keeps diffusers' historical meaning: in SD 1.x configs it is the
/// **number of heads** (8), each of width `channels / 8`; `num_attention_heads`, when set,
/// takes precedence with the same meaning.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct UNetConfig {
    /// Latent channels in (4).
    pub in_channels: usize,
    /// Channels out (4).
    pub out_channels: usize,
    /// Width of each level (320, 640, 1280, 1280).
    pub block_out_channels: Vec<usize>,
    /// `CrossAttnDownBlock2D` or `DownBlock2D` per level.
    pub down_block_types: Vec<String>,
    /// `CrossAttnUpBlock2D` or `UpBlock2D` per level (deepest first).
    pub up_block_types: Vec<String>,
    /// ResNets per down level (2); up levels have one more.
    pub layers_per_block: usize,
    /// Heads per transformer (8; see the type docs).
    pub attention_head_dim: PerLevel,
    /// Heads per transformer when set (overrides `attention_head_dim`).
    pub num_attention_heads: Option<PerLevel>,
    /// Width of the text states (768).
    pub cross_attention_dim: usize,
    /// GroupNorm groups (32).
    pub norm_num_groups: usize,
    /// ResNet/out GroupNorm epsilon (1e-5).
    pub norm_eps: f64,
    /// Linear instead of 1x1-conv `proj_in`/`proj_out` (false).
    pub use_linear_projection: bool,
    /// Transformer blocks per attention (1).
    pub transformer_layers_per_block: PerLevel,
    /// `[cos, sin]` instead of `[sin, cos]` timestep features (true).
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the timestep features (0).
    pub freq_shift: f64,
    /// Padding of the downsampling convs (1).
    pub downsample_padding: usize,
    /// Mid block type (`UNetMidBlock2DCrossAttn`).
    pub mid_block_type: Option<String>,
    /// Latent size the model was trained at (64).
    pub sample_size: usize,
    /// Activation (`silu`).
    pub act_fn: String,
    /// SDXL-style added conditioning (must be absent for SD 1.x).
    pub addition_embed_type: Option<String>,
    /// Class conditioning (must be absent).
    pub class_embed_type: Option<String>,
    /// Time-embedding variant (`positional`).
    pub time_embedding_type: String,
    /// ResNet time conditioning (`default`).
    pub resnet_time_scale_shift: String,
}

impl Default for UNetConfig {
    fn default() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            down_block_types: vec![
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "DownBlock2D".into(),
            ],
            up_block_types: vec![
                "UpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
            ],
            layers_per_block: 2,
            attention_head_dim: PerLevel::One(8),
            num_attention_heads: None,
            cross_attention_dim: 768,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            use_linear_projection: false,
            transformer_layers_per_block: PerLevel::One(1),
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            downsample_padding: 1,
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            sample_size: 64,
            act_fn: "silu".into(),
            addition_embed_type: None,
            class_embed_type: None,
            time_embedding_type: "positional".into(),
            resnet_time_scale_shift: "default".into(),
        }
    }
}

impl UNetConfig {
    /// Heads of the transformers on level `i` (down-block order).
    pub fn heads(&self, i: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(i)
            .unwrap_or(8)
    }

    /// Whether level `i`'s down block has attention.
    pub fn down_has_attention(&self, i: usize) -> bool {
        self.down_block_types
            .get(i)
            .is_some_and(|t| t.starts_with("CrossAttn"))
    }

    /// Checks the layout alone: levels, block types and the mid block (what names the
    /// modules, see [`super::UNetPlan`]), naming what this code does not build.
    pub fn validate_layout(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "{} levels but {} down and {} up block types",
                n,
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return Err(format!("down block type {t} is not supported"));
            }
        }
        for (i, t) in self.up_block_types.iter().enumerate() {
            let mirrored = self.down_has_attention(n - 1 - i);
            let expected = if mirrored {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            };
            if t != expected {
                return Err(format!(
                    "up block {i} is {t}, expected {expected} (mirror of the down blocks)"
                ));
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            Some(m) => return Err(format!("mid block type {m} is not supported")),
            None => return Err("a UNet without a mid block (mid_block_type null)".into()),
        }
        Ok(())
    }

    /// Checks that the configuration is a UNet this code implements, naming what is not.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.validate_layout()?;
        if let Some(a) = &self.addition_embed_type {
            return Err(format!(
                "addition_embed_type {a} (SDXL-style added conditioning)"
            ));
        }
        if let Some(c) = &self.class_embed_type {
            return Err(format!("class_embed_type {c}"));
        }
        if self.time_embedding_type != "positional" {
            return Err(format!("time_embedding_type {}", self.time_embedding_type));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(format!(
                "resnet_time_scale_shift {}",
                self.resnet_time_scale_shift
            ));
        }
        if self.act_fn != "silu" {
            return Err(format!("act_fn {}", self.act_fn));
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if self.norm_num_groups == 0 || c % self.norm_num_groups != 0 {
                return Err(format!(
                    "level {i}: {c} channels are not divisible by norm_num_groups {}",
                    self.norm_num_groups
                ));
            }
            let h = self.heads(i);
            if h == 0 || c % h != 0 {
                return Err(format!(
                    "level {i}: {c} channels cannot be split into {h} heads"
                ));
            }
        }
        Ok(())
    }
}
