//! diffusers `AutoencoderKL`: encoder to a diagonal Gaussian posterior (mean, log-variance),
//! decoder back to pixels, a single-head attention in both mid blocks.

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use super::error::{DiffusionError, Result};
use super::nn::weights::Loader;
use super::nn::{
    Conv2d, DEFAULT_ATTENTION_CHUNK, GroupNorm, Linear, Padding2d, Tensor4,
    scaled_dot_product_attention,
};
use super::params::{Layer, Layers, join};
use super::resnet::{ResnetBlock2D, ResnetConfig};
use super::unet::Upsample2D;

/// GroupNorm epsilon used everywhere in the VAE.
const VAE_EPS: f64 = 1e-6;

/// VAE configuration (diffusers `config.json` fields). Defaults are SD 1.5's.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct VaeConfig {
    /// Image channels in (3).
    pub in_channels: usize,
    /// Image channels out (3).
    pub out_channels: usize,
    /// Latent channels (4).
    pub latent_channels: usize,
    /// Width per level (128, 256, 512, 512); the image is downsampled `levels - 1` times.
    pub block_out_channels: Vec<usize>,
    /// ResNets per encoder level (2); decoder levels have one more.
    pub layers_per_block: usize,
    /// GroupNorm groups (32).
    pub norm_num_groups: usize,
    /// Latent scaling of SD: latents fed to the UNet are `z · scaling_factor` (0.18215).
    pub scaling_factor: f64,
    /// Whether the mid blocks have attention (true).
    pub mid_block_add_attention: bool,
    /// Whether `quant_conv` exists (true).
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists (true).
    pub use_post_quant_conv: bool,
    /// Activation (`silu`).
    pub act_fn: String,
    /// Image size the model was trained at (512).
    pub sample_size: usize,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            mid_block_add_attention: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            act_fn: "silu".into(),
            sample_size: 512,
        }
    }
}

impl VaeConfig {
    /// How many pixels one latent covers along each axis (8 for SD).
    pub fn downsampling_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// Single-head self-attention over the pixels of the VAE mid block.
#[derive(Debug, Clone)]
pub struct VaeAttention<D: Storage<f32>> {
    /// Input norm.
    pub group_norm: GroupNorm<D>,
    /// Query projection.
    pub to_q: Linear<D>,
    /// Key projection.
    pub to_k: Linear<D>,
    /// Value projection.
    pub to_v: Linear<D>,
    /// `to_out.0`.
    pub to_out: Linear<D>,
    /// Queries per attention chunk.
    pub chunk: usize,
}

impl<D: Device<f32>> VaeAttention<D> {
    fn load(l: &Loader<D>, groups: usize, c: usize) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::load(&l.pp("group_norm"), groups, c, VAE_EPS)?,
            to_q: Linear::load(&l.pp("to_q"), c, c, true)?,
            to_k: Linear::load(&l.pp("to_k"), c, c, true)?,
            to_v: Linear::load(&l.pp("to_v"), c, c, true)?,
            to_out: Linear::load(&l.pp("to_out").pp(0), c, c, true)?,
            chunk: DEFAULT_ATTENTION_CHUNK,
        })
    }

    /// `[b, c, h, w] -> [b, c, h, w]`
    pub fn forward<T: Tape<f32, D>>(&self, x: Tensor4<D, T>) -> Tensor4<D, T> {
        let (b, c, h, w) = *x.shape();
        let n = h * w;
        // [b, h*w, c]
        let hs = self
            .group_norm
            .forward(x.retaped::<T>())
            .reshape_like(&(b, c, n))
            .permute::<_, Axes3<0, 2, 1>>()
            .reshape_like(&(b, n, c));
        // one head: [b, 1, h*w, c]
        let q = self
            .to_q
            .forward(hs.retaped::<T>())
            .reshape_like(&(b, 1, n, c));
        let k = self
            .to_k
            .forward(hs.retaped::<T>())
            .reshape_like(&(b, 1, n, c));
        let v = self.to_v.forward(hs).reshape_like(&(b, 1, n, c));
        let o = scaled_dot_product_attention(q, k, v, false, self.chunk).reshape_like(&(b, n, c));
        let o = self
            .to_out
            .forward(o)
            .permute::<_, Axes3<0, 2, 1>>()
            .reshape_like(&(b, c, h, w));
        o + x
    }
}

/// VAE mid block: ResNet, (attention), ResNet.
#[derive(Debug, Clone)]
pub struct VaeMidBlock<D: Storage<f32>> {
    /// `resnets.0`.
    pub resnet0: ResnetBlock2D<D>,
    /// `attentions.0`.
    pub attention: Option<VaeAttention<D>>,
    /// `resnets.1`.
    pub resnet1: ResnetBlock2D<D>,
}

fn vae_resnet(groups: usize, i: usize, o: usize) -> ResnetConfig {
    ResnetConfig {
        in_channels: i,
        out_channels: o,
        temb_channels: None,
        groups,
        eps: VAE_EPS,
    }
}

impl<D: Device<f32>> VaeMidBlock<D> {
    fn load(l: &Loader<D>, groups: usize, c: usize, attention: bool) -> Result<Self> {
        Ok(Self {
            resnet0: ResnetBlock2D::load(&l.pp("resnets").pp(0), &vae_resnet(groups, c, c))?,
            attention: if attention {
                Some(VaeAttention::load(&l.pp("attentions").pp(0), groups, c)?)
            } else {
                None
            },
            resnet1: ResnetBlock2D::load(&l.pp("resnets").pp(1), &vae_resnet(groups, c, c))?,
        })
    }

    fn forward<T: Tape<f32, D>>(&self, x: Tensor4<D, T>) -> Tensor4<D, T> {
        let x = self.resnet0.forward(x, None);
        let x = match &self.attention {
            Some(a) => a.forward(x),
            None => x,
        };
        self.resnet1.forward(x, None)
    }
}

/// One encoder level: ResNets, then (except on the last level) a downsampler that pads the
/// right and bottom by one and applies a 3x3 stride-2 conv without padding.
#[derive(Debug, Clone)]
pub struct EncoderBlock<D: Storage<f32>> {
    /// ResNets.
    pub resnets: Vec<ResnetBlock2D<D>>,
    /// `downsamplers.0.conv`.
    pub downsampler: Option<Conv2d<D>>,
}

/// The VAE encoder: image `[b, 3, H, W]` -> moments `[b, 2 z, H/f, W/f]` (before `quant_conv`).
#[derive(Debug, Clone)]
pub struct Encoder<D: Storage<f32>> {
    /// `conv_in`.
    pub conv_in: Conv2d<D>,
    /// Levels.
    pub down_blocks: Vec<EncoderBlock<D>>,
    /// Mid block.
    pub mid_block: VaeMidBlock<D>,
    /// `conv_norm_out`.
    pub conv_norm_out: GroupNorm<D>,
    /// `conv_out`.
    pub conv_out: Conv2d<D>,
}

impl<D: Device<f32>> Encoder<D> {
    fn load(l: &Loader<D>, c: &VaeConfig) -> Result<Self> {
        let ch = &c.block_out_channels;
        let g = c.norm_num_groups;
        let n = ch.len();
        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let bl = l.pp("down_blocks").pp(i);
            let input = if i == 0 { ch[0] } else { ch[i - 1] };
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    let inp = if j == 0 { input } else { ch[i] };
                    ResnetBlock2D::load(&bl.pp("resnets").pp(j), &vae_resnet(g, inp, ch[i]))
                })
                .collect::<Result<Vec<_>>>()?;
            let downsampler = if i + 1 < n {
                Some(Conv2d::load(
                    &bl.pp("downsamplers").pp(0).pp("conv"),
                    ch[i],
                    ch[i],
                    3,
                    2,
                    Padding2d {
                        top: 0,
                        bottom: 1,
                        left: 0,
                        right: 1,
                    },
                )?)
            } else {
                None
            };
            down_blocks.push(EncoderBlock {
                resnets,
                downsampler,
            });
        }
        let last = ch[n - 1];
        Ok(Self {
            conv_in: Conv2d::load(
                &l.pp("conv_in"),
                c.in_channels,
                ch[0],
                3,
                1,
                Padding2d::same(1),
            )?,
            down_blocks,
            mid_block: VaeMidBlock::load(&l.pp("mid_block"), g, last, c.mid_block_add_attention)?,
            conv_norm_out: GroupNorm::load(&l.pp("conv_norm_out"), g, last, VAE_EPS)?,
            conv_out: Conv2d::load(
                &l.pp("conv_out"),
                last,
                2 * c.latent_channels,
                3,
                1,
                Padding2d::same(1),
            )?,
        })
    }

    fn forward<T: Tape<f32, D>>(&self, x: Tensor4<D, T>) -> Tensor4<D, T> {
        let mut x = self.conv_in.forward(x);
        for block in &self.down_blocks {
            for r in &block.resnets {
                x = r.forward(x, None);
            }
            if let Some(d) = &block.downsampler {
                x = d.forward(x);
            }
        }
        let x = self.mid_block.forward(x);
        self.conv_out.forward(self.conv_norm_out.forward_silu(x))
    }
}

/// One decoder level: `layers + 1` ResNets, then (except on the last level) nearest x2
/// upsampling and a 3x3 conv.
#[derive(Debug, Clone)]
pub struct DecoderBlock<D: Storage<f32>> {
    /// ResNets.
    pub resnets: Vec<ResnetBlock2D<D>>,
    /// `upsamplers.0`.
    pub upsampler: Option<Upsample2D<D>>,
}

/// The VAE decoder: latents `[b, z, h, w]` (after `post_quant_conv`) -> image `[b, 3, h f, w f]`.
#[derive(Debug, Clone)]
pub struct Decoder<D: Storage<f32>> {
    /// `conv_in`.
    pub conv_in: Conv2d<D>,
    /// Mid block.
    pub mid_block: VaeMidBlock<D>,
    /// Levels, deepest first.
    pub up_blocks: Vec<DecoderBlock<D>>,
    /// `conv_norm_out`.
    pub conv_norm_out: GroupNorm<D>,
    /// `conv_out`.
    pub conv_out: Conv2d<D>,
}

impl<D: Device<f32>> Decoder<D> {
    fn load(l: &Loader<D>, c: &VaeConfig) -> Result<Self> {
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let g = c.norm_num_groups;
        let n = rev.len();
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev = rev[0];
        for (i, &out) in rev.iter().enumerate() {
            let bl = l.pp("up_blocks").pp(i);
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    let inp = if j == 0 { prev } else { out };
                    ResnetBlock2D::load(&bl.pp("resnets").pp(j), &vae_resnet(g, inp, out))
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = if i + 1 < n {
                Some(Upsample2D::load(&bl.pp("upsamplers").pp(0), out)?)
            } else {
                None
            };
            up_blocks.push(DecoderBlock { resnets, upsampler });
            prev = out;
        }
        let c0 = c.block_out_channels[0];
        Ok(Self {
            conv_in: Conv2d::load(
                &l.pp("conv_in"),
                c.latent_channels,
                rev[0],
                3,
                1,
                Padding2d::same(1),
            )?,
            mid_block: VaeMidBlock::load(&l.pp("mid_block"), g, rev[0], c.mid_block_add_attention)?,
            up_blocks,
            conv_norm_out: GroupNorm::load(&l.pp("conv_norm_out"), g, c0, VAE_EPS)?,
            conv_out: Conv2d::load(
                &l.pp("conv_out"),
                c0,
                c.out_channels,
                3,
                1,
                Padding2d::same(1),
            )?,
        })
    }

    fn forward<T: Tape<f32, D>>(&self, z: Tensor4<D, T>) -> Tensor4<D, T> {
        let x = self.conv_in.forward(z);
        let mut x = self.mid_block.forward(x);
        for block in &self.up_blocks {
            for r in &block.resnets {
                x = r.forward(x, None);
            }
            if let Some(u) = &block.upsampler {
                x = u.forward(x);
            }
        }
        self.conv_out.forward(self.conv_norm_out.forward_silu(x))
    }
}

/// The VAE posterior `N(mean, std²)` of each latent, as diffusers' `DiagonalGaussianDistribution`.
#[derive(Debug, Clone)]
pub struct LatentDistribution<D: Storage<f32>, T = NoneTape> {
    /// `[b, z, h, w]`
    pub mean: Tensor4<D, T>,
    /// `[b, z, h, w]`, clamped to [-30, 20].
    pub logvar: Tensor4<D>,
    /// `[b, z, h, w]`: `exp(logvar / 2)`.
    pub std: Tensor4<D>,
}

/// The KL autoencoder.
#[derive(Debug, Clone)]
pub struct Vae<D: Storage<f32>> {
    /// Encoder.
    pub encoder: Encoder<D>,
    /// Decoder.
    pub decoder: Decoder<D>,
    /// 1x1 conv on the encoder's moments.
    pub quant_conv: Option<Conv2d<D>>,
    /// 1x1 conv on latents before the decoder.
    pub post_quant_conv: Option<Conv2d<D>>,
    /// The configuration the weights were loaded for.
    pub config: VaeConfig,
}

impl<D: Device<f32>> Vae<D> {
    /// Loads the VAE from diffusers names (`encoder.*`, `decoder.*`, `quant_conv.*`, …).
    pub fn load(l: &Loader<D>, config: &VaeConfig) -> Result<Self> {
        let c = config;
        let bad = |reason: String| DiffusionError::Input {
            model: "Vae",
            reason: format!("unsupported config: {reason}"),
        };
        if c.block_out_channels.is_empty() {
            return Err(bad("block_out_channels is empty".into()));
        }
        if c.act_fn != "silu" {
            return Err(bad(format!("act_fn {}", c.act_fn)));
        }
        let z = c.latent_channels;
        let one = |name: &str, i: usize, o: usize| -> Result<Conv2d<D>> {
            Conv2d::load(&l.pp(name), i, o, 1, 1, Padding2d::default())
        };
        Ok(Self {
            encoder: Encoder::load(&l.pp("encoder"), c)?,
            decoder: Decoder::load(&l.pp("decoder"), c)?,
            quant_conv: if c.use_quant_conv {
                Some(one("quant_conv", 2 * z, 2 * z)?)
            } else {
                None
            },
            post_quant_conv: if c.use_post_quant_conv {
                Some(one("post_quant_conv", z, z)?)
            } else {
                None
            },
            config: c.clone(),
        })
    }

    /// Sets the number of queries per chunk of the mid-block attentions.
    pub fn set_attention_chunk(&mut self, chunk: usize) {
        for a in [
            &mut self.encoder.mid_block.attention,
            &mut self.decoder.mid_block.attention,
        ]
        .into_iter()
        .flatten()
        {
            a.chunk = chunk;
        }
    }

    fn check_image(&self, x: &(usize, usize, usize, usize)) -> Result<()> {
        let f = self.config.downsampling_factor();
        let (_, c, h, w) = *x;
        if c != self.config.in_channels || h == 0 || w == 0 || h % f != 0 || w % f != 0 {
            return Err(DiffusionError::Input {
                model: "Vae::encode",
                reason: format!(
                    "image of shape [_, {c}, {h}, {w}]; expected {} channels and a size that is a multiple of {f}",
                    self.config.in_channels
                ),
            });
        }
        Ok(())
    }

    /// The posterior of images `[b, 3, H, W]` in [-1, 1] (H, W multiples of the downsampling
    /// factor): mean, clamped log-variance and std of the latents `[b, z, H/f, W/f]`.
    pub fn encode(&self, image: Tensor4<D>) -> Result<LatentDistribution<D>> {
        let (mean, logvar) = self.encode_moments(image)?;
        let std = (logvar.clone() * 0.5).exp();
        Ok(LatentDistribution { mean, logvar, std })
    }

    /// The posterior's mean and clamped log-variance `[b, z, H/f, W/f]` of images `[b, 3, H, W]`,
    /// under the images' tape: what training the VAE differentiates.
    pub fn encode_moments<T: Tape<f32, D>>(
        &self,
        image: Tensor4<D, T>,
    ) -> Result<(Tensor4<D, T>, Tensor4<D, T>)> {
        self.check_image(image.shape())?;
        let moments = self.encoder.forward(image);
        let moments = match &self.quant_conv {
            Some(q) => q.forward(moments),
            None => moments,
        };
        let z = self.config.latent_channels;
        let mean = moments.retaped::<T>().slice((.., 0..z, .., ..));
        let logvar = moments.slice((.., z..2 * z, .., ..)).clamp(-30.0, 20.0);
        Ok((mean, logvar))
    }

    /// Decodes (unscaled) latents `[b, z, h, w]` to images `[b, 3, h f, w f]`, raw decoder
    /// output (about [-1, 1]; map with `(x / 2 + 0.5).clamp(0, 1)`). SD latents must be divided
    /// by `config.scaling_factor` first.
    pub fn decode<T: Tape<f32, D>>(&self, latents: Tensor4<D, T>) -> Result<Tensor4<D, T>> {
        let (_, c, h, w) = *latents.shape();
        if c != self.config.latent_channels || h == 0 || w == 0 {
            return Err(DiffusionError::Input {
                model: "Vae::decode",
                reason: format!(
                    "latents of shape [_, {c}, {h}, {w}], expected {} channels",
                    self.config.latent_channels
                ),
            });
        }
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(latents),
            None => latents,
        };
        Ok(self.decoder.forward(z))
    }
}

impl<D: Device<f32>> Layers<D> for VaeAttention<D> {
    fn visit_layers(&mut self, prefix: &str, f: &mut dyn FnMut(&str, Layer<'_, D>)) {
        f(
            &join(prefix, "group_norm"),
            Layer::GroupNorm(&mut self.group_norm),
        );
        f(&join(prefix, "to_q"), Layer::Linear(&mut self.to_q));
        f(&join(prefix, "to_k"), Layer::Linear(&mut self.to_k));
        f(&join(prefix, "to_v"), Layer::Linear(&mut self.to_v));
        f(&join(prefix, "to_out.0"), Layer::Linear(&mut self.to_out));
    }
}

impl<D: Device<f32>> Layers<D> for VaeMidBlock<D> {
    fn visit_layers(&mut self, prefix: &str, f: &mut dyn FnMut(&str, Layer<'_, D>)) {
        self.resnet0.visit_layers(&join(prefix, "resnets.0"), f);
        if let Some(a) = &mut self.attention {
            a.visit_layers(&join(prefix, "attentions.0"), f);
        }
        self.resnet1.visit_layers(&join(prefix, "resnets.1"), f);
    }
}

impl<D: Device<f32>> Layers<D> for Vae<D> {
    /// Names as diffusers stores them (`encoder.down_blocks.0.resnets.0.conv1`, …).
    fn visit_layers(&mut self, prefix: &str, f: &mut dyn FnMut(&str, Layer<'_, D>)) {
        let enc = join(prefix, "encoder");
        let e = &mut self.encoder;
        f(&join(&enc, "conv_in"), Layer::Conv(&mut e.conv_in));
        for (i, b) in e.down_blocks.iter_mut().enumerate() {
            let base = join(&enc, format!("down_blocks.{i}"));
            for (j, r) in b.resnets.iter_mut().enumerate() {
                r.visit_layers(&join(&base, format!("resnets.{j}")), f);
            }
            if let Some(d) = &mut b.downsampler {
                f(&join(&base, "downsamplers.0.conv"), Layer::Conv(d));
            }
        }
        e.mid_block.visit_layers(&join(&enc, "mid_block"), f);
        f(
            &join(&enc, "conv_norm_out"),
            Layer::GroupNorm(&mut e.conv_norm_out),
        );
        f(&join(&enc, "conv_out"), Layer::Conv(&mut e.conv_out));
        if let Some(q) = &mut self.quant_conv {
            f(&join(prefix, "quant_conv"), Layer::Conv(q));
        }
        if let Some(q) = &mut self.post_quant_conv {
            f(&join(prefix, "post_quant_conv"), Layer::Conv(q));
        }
        let dec = join(prefix, "decoder");
        let d = &mut self.decoder;
        f(&join(&dec, "conv_in"), Layer::Conv(&mut d.conv_in));
        d.mid_block.visit_layers(&join(&dec, "mid_block"), f);
        for (i, b) in d.up_blocks.iter_mut().enumerate() {
            let base = join(&dec, format!("up_blocks.{i}"));
            for (j, r) in b.resnets.iter_mut().enumerate() {
                r.visit_layers(&join(&base, format!("resnets.{j}")), f);
            }
            if let Some(u) = &mut b.upsampler {
                f(&join(&base, "upsamplers.0.conv"), Layer::Conv(&mut u.conv));
            }
        }
        f(
            &join(&dec, "conv_norm_out"),
            Layer::GroupNorm(&mut d.conv_norm_out),
        );
        f(&join(&dec, "conv_out"), Layer::Conv(&mut d.conv_out));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::nn::weights::WeightStore;

    #[test]
    fn other_architectures_encode_and_decode() {
        let dev = Cpu::default();
        let config = VaeConfig {
            block_out_channels: vec![8, 16, 16],
            layers_per_block: 1,
            norm_num_groups: 4,
            latent_channels: 3,
            ..VaeConfig::default()
        };
        let store = WeightStore::synthetic(5);
        let mut vae = Vae::load(&Loader::new(&store, &dev), &config).unwrap();
        vae.set_attention_chunk(4);
        assert_eq!(config.downsampling_factor(), 4);
        let image: Tensor4<Cpu> = dev.sample_normal_like(&(2, 3, 12, 8));
        let post = vae.encode(image).unwrap();
        assert_eq!(*post.mean.shape(), (2, 3, 3, 2));
        assert!(post.std.as_vec().iter().all(|v| *v > 0.0));
        let decoded = vae.decode(post.mean).unwrap();
        assert_eq!(*decoded.shape(), (2, 3, 12, 8));
        let bad: Tensor4<Cpu> = dev.sample_normal_like(&(1, 3, 10, 8));
        assert!(vae.encode(bad).is_err());
    }
}
