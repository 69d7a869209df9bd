//! diffusers `UNet2DConditionModel` as SD 1.x uses it: sinusoidal timestep embedding and its
//! MLP, `conv_in`, down blocks (collecting skip states), the cross-attention mid block, up
//! blocks (consuming them), GroupNorm, SiLU, `conv_out`.

use dfdx::prelude::*;

use crate::diffusion::nn::elem::{Elem, elems};
use serde::{Deserialize, Serialize};

use super::error::{DiffusionError, Result};
use super::nn::weights::Loader;
use super::nn::{Conv2d, GroupNorm, Linear, Padding2d, Tensor2, Tensor3, Tensor4, silu};
use super::params::{Layer, Layers, join};
use super::unet_blocks::{BlockSettings, DownBlock, MidBlock, UpBlock};

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

    /// Checks that the configuration is a UNet this code implements, naming what is not.
    pub fn validate(&self) -> std::result::Result<(), String> {
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
        if let Some(m) = &self.mid_block_type
            && m != "UNetMidBlock2DCrossAttn"
        {
            return Err(format!("mid block type {m} is not supported"));
        }
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

/// The UNet.
#[derive(Debug, Clone)]
pub struct UNet<D: Storage<E>, E = f32> {
    /// `time_embedding.linear_1`: `[4 c0, c0]`.
    pub time_linear_1: Linear<D, E>,
    /// `time_embedding.linear_2`: `[4 c0, 4 c0]`.
    pub time_linear_2: Linear<D, E>,
    /// `conv_in`.
    pub conv_in: Conv2d<D, E>,
    /// Down blocks.
    pub down_blocks: Vec<DownBlock<D, E>>,
    /// Mid block.
    pub mid_block: MidBlock<D, E>,
    /// Up blocks.
    pub up_blocks: Vec<UpBlock<D, E>>,
    /// `conv_norm_out`.
    pub conv_norm_out: GroupNorm<D, E>,
    /// `conv_out`.
    pub conv_out: Conv2d<D, E>,
    /// The configuration the weights were loaded for.
    pub config: UNetConfig,
}

impl<E: Elem, D: Device<E>> UNet<D, E> {
    /// Calls `f` with the diffusers module path and the layer of every attention projection,
    /// in module order: `…transformer_blocks.K.attn1.to_q`, `to_k`, `to_v`, `to_out.0`, then
    /// the same for `attn2` (the modules LoRA targets by default).
    pub fn for_each_attention_linear_mut(&mut self, mut f: impl FnMut(&str, &mut Linear<D, E>)) {
        let mut visit = |prefix: String, t: &mut super::attention::Transformer2D<D, E>| {
            for (k, block) in t.transformer_blocks.iter_mut().enumerate() {
                for (name, attn) in [("attn1", &mut block.attn1), ("attn2", &mut block.attn2)] {
                    let base = format!("{prefix}.transformer_blocks.{k}.{name}");
                    f(&format!("{base}.to_q"), &mut attn.to_q);
                    f(&format!("{base}.to_k"), &mut attn.to_k);
                    f(&format!("{base}.to_v"), &mut attn.to_v);
                    f(&format!("{base}.to_out.0"), &mut attn.to_out);
                }
            }
        };
        for (i, block) in self.down_blocks.iter_mut().enumerate() {
            for (j, t) in block.attentions.iter_mut().enumerate() {
                visit(format!("down_blocks.{i}.attentions.{j}"), t);
            }
        }
        visit(
            "mid_block.attentions.0".to_string(),
            &mut self.mid_block.attention,
        );
        for (i, block) in self.up_blocks.iter_mut().enumerate() {
            for (j, t) in block.attentions.iter_mut().enumerate() {
                visit(format!("up_blocks.{i}.attentions.{j}"), t);
            }
        }
    }

    /// Calls `f` with the diffusers module path (`…transformer_blocks.K.attn1`, `…attn2`) and
    /// the layer of every attention, in module order.
    pub fn for_each_attention_mut(
        &mut self,
        mut f: impl FnMut(&str, &mut super::attention::CrossAttention<D, E>),
    ) {
        let mut visit = |prefix: String, t: &mut super::attention::Transformer2D<D, E>| {
            for (k, block) in t.transformer_blocks.iter_mut().enumerate() {
                f(
                    &format!("{prefix}.transformer_blocks.{k}.attn1"),
                    &mut block.attn1,
                );
                f(
                    &format!("{prefix}.transformer_blocks.{k}.attn2"),
                    &mut block.attn2,
                );
            }
        };
        for (i, block) in self.down_blocks.iter_mut().enumerate() {
            for (j, t) in block.attentions.iter_mut().enumerate() {
                visit(format!("down_blocks.{i}.attentions.{j}"), t);
            }
        }
        visit(
            "mid_block.attentions.0".to_string(),
            &mut self.mid_block.attention,
        );
        for (i, block) in self.up_blocks.iter_mut().enumerate() {
            for (j, t) in block.attentions.iter_mut().enumerate() {
                visit(format!("up_blocks.{i}.attentions.{j}"), t);
            }
        }
    }

    /// The context widths the attentions of this UNet see (the width of `to_k`'s input): the
    /// text-encoder width for cross-attention and each level's width for self-attention;
    /// sorted, without repeats. These are the widths a hypernetwork can have modules for.
    pub fn attention_context_widths(&mut self) -> Vec<usize> {
        let mut widths = Vec::new();
        self.for_each_attention_mut(|_, a| widths.push(a.to_k.in_features()));
        widths.sort_unstable();
        widths.dedup();
        widths
    }

    /// Loads the UNet from diffusers names (`conv_in.weight`, `down_blocks.0.resnets.0…`).
    pub fn load(l: &Loader<D, E>, config: &UNetConfig) -> Result<Self> {
        let c = config;
        c.validate().map_err(|reason| DiffusionError::Input {
            model: "UNet",
            reason: format!("unsupported config: {reason}"),
        })?;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let c0 = ch[0];
        let temb = 4 * c0;
        let settings = |level: usize| BlockSettings {
            temb_channels: temb,
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            context_dim: c.cross_attention_dim,
            transformer_layers: c.transformer_layers_per_block.get(level).unwrap_or(1),
            use_linear_projection: c.use_linear_projection,
            downsample_padding: c.downsample_padding,
        };
        let te = l.pp("time_embedding");
        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let input = if i == 0 { c0 } else { ch[i - 1] };
            down_blocks.push(DownBlock::load(
                &l.pp("down_blocks").pp(i),
                &settings(i),
                input,
                ch[i],
                c.layers_per_block,
                c.down_has_attention(i).then(|| c.heads(i)),
                i + 1 < n,
            )?);
        }
        let mid_block = MidBlock::load(
            &l.pp("mid_block"),
            &settings(n - 1),
            ch[n - 1],
            c.heads(n - 1),
        )?;
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_output = ch[n - 1];
        for i in 0..n {
            let level = n - 1 - i;
            let out = ch[level];
            let input = ch[level.saturating_sub(1)];
            up_blocks.push(UpBlock::load(
                &l.pp("up_blocks").pp(i),
                &settings(level),
                input,
                prev_output,
                out,
                c.layers_per_block,
                c.down_has_attention(level).then(|| c.heads(level)),
                i + 1 < n,
            )?);
            prev_output = out;
        }
        Ok(Self {
            time_linear_1: Linear::load(&te.pp("linear_1"), c0, temb, true)?,
            time_linear_2: Linear::load(&te.pp("linear_2"), temb, temb, true)?,
            conv_in: Conv2d::load(
                &l.pp("conv_in"),
                c.in_channels,
                c0,
                3,
                1,
                Padding2d::same(1),
            )?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(
                &l.pp("conv_norm_out"),
                c.norm_num_groups,
                c0,
                c.norm_eps,
            )?,
            conv_out: Conv2d::load(
                &l.pp("conv_out"),
                c0,
                c.out_channels,
                3,
                1,
                Padding2d::same(1),
            )?,
            config: c.clone(),
        })
    }

    /// Sets the number of queries per attention chunk in every transformer (default
    /// [`super::nn::DEFAULT_ATTENTION_CHUNK`]); smaller bounds memory, larger is faster.
    pub fn set_attention_chunk(&mut self, chunk: usize) {
        for b in &mut self.down_blocks {
            b.attentions
                .iter_mut()
                .for_each(|a| a.set_attention_chunk(chunk));
        }
        self.mid_block.attention.set_attention_chunk(chunk);
        for b in &mut self.up_blocks {
            b.attentions
                .iter_mut()
                .for_each(|a| a.set_attention_chunk(chunk));
        }
    }

    /// Turns gradient checkpointing of every ResNet and transformer on or off: under a tape,
    /// their activations are recomputed in the backward pass instead of kept (less memory
    /// between the passes, one more forward pass of each block; see
    /// [`super::recompute`]). No effect without a tape.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        let mid = &mut self.mid_block;
        let resnets = self
            .down_blocks
            .iter_mut()
            .flat_map(|b| b.resnets.iter_mut())
            .chain([&mut mid.resnet0, &mut mid.resnet1])
            .chain(self.up_blocks.iter_mut().flat_map(|b| b.resnets.iter_mut()));
        resnets.for_each(|r| r.checkpoint = on);
        let attentions = self
            .down_blocks
            .iter_mut()
            .flat_map(|b| b.attentions.iter_mut())
            .chain([&mut mid.attention])
            .chain(
                self.up_blocks
                    .iter_mut()
                    .flat_map(|b| b.attentions.iter_mut()),
            );
        attentions.for_each(|a| a.checkpoint = on);
    }

    /// Sinusoidal timestep features `[b, c0]` computed as diffusers' `get_timestep_embedding`
    /// does in f32: `exp(-ln(10000) · i / (half - freq_shift))`, `[cos, sin]` when flipped.
    pub fn timestep_features(&self, timesteps: &[f32]) -> Vec<f32> {
        let dim = self.config.block_out_channels[0];
        let half = dim / 2;
        let denom = half as f32 - self.config.freq_shift as f32;
        let freqs: Vec<f32> = (0..half)
            .map(|i| ((-(10000f32.ln())) * i as f32 / denom).exp())
            .collect();
        let mut out = Vec::with_capacity(timesteps.len() * dim);
        for &t in timesteps {
            let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
            let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
            let (first, second) = if self.config.flip_sin_to_cos {
                (cos, sin)
            } else {
                (sin, cos)
            };
            out.extend(first);
            out.extend(second);
            // odd dims are zero-padded as in diffusers
            out.extend(std::iter::repeat_n(0.0, dim - 2 * half));
        }
        out
    }

    /// Predicts the noise: `sample: [b, in, h, w]`, `timesteps`: one per batch item (or one for
    /// all), `context: [b, m, cross_attention_dim]` -> `[b, out, h, w]`. `h` and `w` must be
    /// divisible by `2^(levels-1)`.
    ///
    /// Gradients flow to `sample` and `context` (and to whatever produced them) when they carry
    /// a tape; the parameters are constants.
    pub fn forward<T: Tape<E, D>>(
        &self,
        sample: Tensor4<D, T, E>,
        timesteps: &[f32],
        context: Tensor3<D, T, E>,
    ) -> Result<Tensor4<D, T, E>> {
        let (b, c, h, w) = *sample.shape();
        let (cb, _, cd) = *context.shape();
        let err = |reason: String| DiffusionError::Input {
            model: "UNet",
            reason,
        };
        if c != self.config.in_channels {
            return Err(err(format!(
                "sample has {c} channels, the UNet takes {}",
                self.config.in_channels
            )));
        }
        let factor = 1usize << (self.config.block_out_channels.len() - 1);
        if h == 0 || w == 0 || h % factor != 0 || w % factor != 0 {
            return Err(err(format!(
                "sample size {h}x{w} is not a multiple of {factor}"
            )));
        }
        if cb != b || cd != self.config.cross_attention_dim {
            return Err(err(format!(
                "context of shape [{cb}, _, {cd}] for a batch of {b}, expected width {}",
                self.config.cross_attention_dim
            )));
        }
        let timesteps: Vec<f32> = match timesteps.len() {
            1 => vec![timesteps[0]; b],
            n if n == b => timesteps.to_vec(),
            n => return Err(err(format!("{n} timesteps for a batch of {b}"))),
        };
        let dev = sample.device().clone();
        let c0 = self.config.block_out_channels[0];
        // [b, c0] -> [b, 4 c0]
        let t_feat: Tensor2<D, T, E> = dev
            .tensor_from_vec(elems(self.timestep_features(&timesteps)), (b, c0))
            .retaped::<T>();
        let temb = self
            .time_linear_2
            .forward2(silu(self.time_linear_1.forward2(t_feat)));

        // every block re-tapes the shared time embedding and context; their own tapes join
        // the main one here, once
        let (temb, temb_tape) = temb.split_tape();
        let (context, ctx_tape) = context.split_tape();
        let (x, x_tape) = sample.split_tape();
        let x = x.put_tape(x_tape.merge(temb_tape).merge(ctx_tape));

        let mut x = self.conv_in.forward(x);
        let mut skips = vec![x.retaped::<T>()];
        for block in &self.down_blocks {
            x = block.forward(x, &temb, &context, &mut skips);
        }
        x = self.mid_block.forward(x, &temb, &context);
        for block in &self.up_blocks {
            x = block.forward(x, &temb, &context, &mut skips);
        }
        Ok(self.conv_out.forward(self.conv_norm_out.forward_silu(x)))
    }
}

impl<E: Elem, D: Device<E>> Layers<D, E> for UNet<D, E> {
    fn visit_layers(&mut self, prefix: &str, f: &mut dyn FnMut(&str, Layer<'_, D, E>)) {
        f(
            &join(prefix, "time_embedding.linear_1"),
            Layer::Linear(&mut self.time_linear_1),
        );
        f(
            &join(prefix, "time_embedding.linear_2"),
            Layer::Linear(&mut self.time_linear_2),
        );
        f(&join(prefix, "conv_in"), Layer::Conv(&mut self.conv_in));
        for (i, b) in self.down_blocks.iter_mut().enumerate() {
            b.visit_layers(&join(prefix, format!("down_blocks.{i}")), f);
        }
        self.mid_block.visit_layers(&join(prefix, "mid_block"), f);
        for (i, b) in self.up_blocks.iter_mut().enumerate() {
            b.visit_layers(&join(prefix, format!("up_blocks.{i}")), f);
        }
        f(
            &join(prefix, "conv_norm_out"),
            Layer::GroupNorm(&mut self.conv_norm_out),
        );
        f(&join(prefix, "conv_out"), Layer::Conv(&mut self.conv_out));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::nn::weights::WeightStore;

    /// An architecture unlike the fixture's: 3 levels, 2 ResNets per level, per-level head
    /// counts, 2 transformer blocks per attention, linear projections, odd widths.
    #[test]
    fn other_architectures_run_forward_and_backward() {
        let dev = Cpu::default();
        let config = UNetConfig {
            block_out_channels: vec![16, 32, 48],
            down_block_types: vec![
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "DownBlock2D".into(),
            ],
            up_block_types: vec![
                "UpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
            ],
            layers_per_block: 2,
            attention_head_dim: PerLevel::Each(vec![2, 4, 4]),
            cross_attention_dim: 24,
            norm_num_groups: 4,
            use_linear_projection: true,
            transformer_layers_per_block: PerLevel::One(2),
            ..UNetConfig::default()
        };
        let store = WeightStore::synthetic(3);
        let mut unet = UNet::load(&Loader::new(&store, &dev), &config).unwrap();
        unet.set_attention_chunk(7);
        let sample: Tensor4<Cpu> = dev.sample_normal_like(&(2, 4, 12, 12));
        let context: Tensor3<Cpu> = dev.sample_normal_like(&(2, 5, 24));
        let out = unet
            .forward(sample.leaky_trace(), &[3.0, 700.0], context.retaped())
            .unwrap();
        assert_eq!(*out.shape(), (2, 4, 12, 12));
        let grads = out.square().mean().backward();
        let gs = grads.get(&sample).as_vec();
        let gc = grads.get(&context).as_vec();
        assert!(gs.iter().chain(&gc).all(|v| v.is_finite()));
        assert!(gs.iter().any(|v| *v != 0.0) && gc.iter().any(|v| *v != 0.0));

        // a size that the levels cannot halve is an error, not a panic
        let bad: Tensor4<Cpu> = dev.sample_normal_like(&(2, 4, 10, 12));
        let ctx: Tensor3<Cpu> = dev.sample_normal_like(&(2, 5, 24));
        assert!(unet.forward(bad, &[1.0], ctx).is_err());
    }
}
