//! The architecture a pretraining stage builds from scratch.

use serde::{Deserialize, Serialize};

use crate::diffusion::checkpoint::single_file::StoredConfigs;
use crate::diffusion::clip::{ClipActivation, ClipConfig};
use crate::diffusion::unet::{PerLevel, UNetConfig};
use crate::diffusion::vae::VaeConfig;

/// The architecture of a pretrained model. Defaults: the bundled base model's, for 64×64 images
/// and 8×8×4 latents (about 1 M parameters, plus the 49408-row token table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Architecture {
    /// UNet width per level (`[32, 64]`); every level but the last has cross-attention.
    pub unet_channels: Vec<usize>,
    /// ResNets per UNet down level (1).
    pub unet_layers_per_block: usize,
    /// Attention heads per UNet transformer (4).
    pub unet_heads: usize,
    /// GroupNorm groups of the UNet and the VAE (8).
    pub norm_groups: usize,
    /// VAE width per level (`[16, 32, 64, 64]`: the image is downsampled 8×, as in SD).
    pub vae_channels: Vec<usize>,
    /// ResNets per VAE encoder level (1).
    pub vae_layers_per_block: usize,
    /// Latent channels (4).
    pub latent_channels: usize,
    /// Text-encoder width (64).
    pub text_width: usize,
    /// Text-encoder layers (2).
    pub text_layers: usize,
    /// Text-encoder attention heads (4).
    pub text_heads: usize,
}

impl Default for Architecture {
    fn default() -> Self {
        Self {
            unet_channels: vec![32, 64],
            unet_layers_per_block: 1,
            unet_heads: 4,
            norm_groups: 8,
            vae_channels: vec![16, 32, 64, 64],
            vae_layers_per_block: 1,
            latent_channels: 4,
            text_width: 64,
            text_layers: 2,
            text_heads: 4,
        }
    }
}

impl Architecture {
    /// The diffusers configs of the three models for images of `resolution` pixels.
    pub fn configs(&self, resolution: u32) -> StoredConfigs {
        let n = self.unet_channels.len();
        let down: Vec<String> = (0..n)
            .map(|i| {
                if i + 1 < n {
                    "CrossAttnDownBlock2D"
                } else {
                    "DownBlock2D"
                }
                .into()
            })
            .collect();
        let up: Vec<String> = (0..n)
            .map(|i| {
                if i == 0 {
                    "UpBlock2D"
                } else {
                    "CrossAttnUpBlock2D"
                }
                .into()
            })
            .collect();
        let vae = VaeConfig {
            block_out_channels: self.vae_channels.clone(),
            layers_per_block: self.vae_layers_per_block,
            latent_channels: self.latent_channels,
            norm_num_groups: self.norm_groups,
            sample_size: resolution as usize,
            scaling_factor: 1.0,
            ..VaeConfig::default()
        };
        let latent = resolution as usize / vae.downsampling_factor().max(1);
        StoredConfigs {
            unet: UNetConfig {
                in_channels: self.latent_channels,
                out_channels: self.latent_channels,
                block_out_channels: self.unet_channels.clone(),
                down_block_types: down,
                up_block_types: up,
                layers_per_block: self.unet_layers_per_block,
                attention_head_dim: PerLevel::One(self.unet_heads),
                cross_attention_dim: self.text_width,
                norm_num_groups: self.norm_groups,
                sample_size: latent,
                ..UNetConfig::default()
            },
            vae,
            text_encoder: ClipConfig {
                hidden_size: self.text_width,
                intermediate_size: 4 * self.text_width,
                num_hidden_layers: self.text_layers,
                num_attention_heads: self.text_heads,
                hidden_act: ClipActivation::QuickGelu,
                ..ClipConfig::default()
            },
        }
    }
}
