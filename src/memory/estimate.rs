//! The peak memory of a training run, estimated from the model configs before anything is
//! loaded: weights, what trains (gradients, the optimiser's state, the host copies the step
//! loop makes), and the activations the UNet (and, for textual inversion, the text encoder)
//! keeps for the backward pass.
//!
//! Activations are counted per sample from the architecture: every tensor a layer keeps for
//! its backward (ResNet: norm, convolution and residual outputs; transformer: norms, the
//! q/k/v projections and their per-head copies, the attention output, the GEGLU
//! feed-forward), plus the attention probabilities: on the CPU the attention kernel keeps them
//! only while `batch · heads · queries · keys ≤ 2^26` and recomputes them chunk by chunk above
//! that; the generic (GPU) composition keeps the scores, the scaled scores and the
//! probabilities of every chunk. At the peak of the backward pass the kept activations and the
//! gradients in flight are alive together: [`ACTIVATION_PEAK_FACTOR`] times the kept
//! activations. A taped forward also holds a weight-sized buffer per weight it passes through
//! (see [`MemoryEstimate::weight_copies`]). The factor and the counts were checked against
//! the measured peaks of `sdpipe bench` (docs/benchmarks.md, "Memory estimate vs measured").

use serde::Serialize;

use crate::diffusion::VaeConfig;
use crate::diffusion::attention::Transformer2DConfig;
use crate::diffusion::checkpoint::single_file::StoredConfigs;
use crate::diffusion::clip::ClipConfig;
use crate::diffusion::resnet::ResnetConfig;
use crate::diffusion::unet::UNetPlan;
use crate::train::optim::OptimizerKind;

/// Bytes of one value (f32 everywhere for now).
const F32: u64 = 4;

/// Peak of the backward pass / kept activations (the saved tensors plus the gradients in
/// flight), fitted to the peaks `sdpipe bench` measures on the CPU where activations dominate
/// (1.1–1.2 there; the estimate stays on the safe side).
pub const ACTIVATION_PEAK_FACTOR: f64 = 1.25;

/// The process's own memory beside the tensors (thread stacks, allocator arenas, gemm packing
/// buffers): what `sdpipe bench --task unet-forward` on the tiny model measures above its
/// weights and activations.
const RUNTIME_OVERHEAD: u64 = 12 << 20;

/// Queries per attention chunk of the VAE's mid-block.
const DEFAULT_CHUNK: u64 = crate::diffusion::nn::DEFAULT_ATTENTION_CHUNK as u64;

/// Elements of attention probabilities the CPU attention kernel keeps per call (above, the
/// backward recomputes them).
const CPU_MAX_KEPT_PROBS: u64 = 1 << 26;

/// What a training method trains.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainedPart {
    /// LoRA adapters of `rank` on the UNet's layers whose paths end with one of `targets`
    /// (`to_q`, `to_k`, `to_v`, `to_out.0`, `conv1`…), and on the text encoder's with
    /// `text_encoder`.
    Lora {
        /// Rank.
        rank: usize,
        /// Module-path suffixes in the UNet.
        targets: Vec<String>,
        /// Module-path suffixes in the text encoder (`q_proj`, `mlp.fc1`…), when it is adapted.
        text_encoder: Option<Vec<String>>,
        /// The algorithm (`Lora`, `Locon`, `Loha`, `Lokr`, `Dora`).
        method: crate::train::Method,
    },
    /// `vectors` new token vectors (textual inversion): the text encoder runs under the tape.
    TextualInversion {
        /// Vectors per token.
        vectors: usize,
    },
    /// Every UNet weight (DreamBooth), and the text encoder's with `text_encoder`.
    FullUnet {
        /// Whether the text encoder trains too.
        text_encoder: bool,
    },
    /// A hypernetwork of `params` parameters on the attentions' context.
    Hypernetwork {
        /// Its parameters.
        params: usize,
    },
}

/// The shape of one training step.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainShape {
    /// Samples per micro-batch.
    pub batch: usize,
    /// Image height and width in pixels.
    pub height: usize,
    /// See `height`.
    pub width: usize,
    /// Queries per attention chunk.
    pub attention_chunk: usize,
    /// `cpu` or `cuda:N` (the attention kernels differ in what they keep).
    pub device: String,
    /// Whether the UNet's blocks are recomputed in the backward pass instead of kept.
    pub gradient_checkpointing: bool,
    /// Whether the text encoder and the VAE are loaded beside the UNet (the train stage loads
    /// the whole pipeline; `sdpipe bench` only what its task runs).
    pub loaded: LoadedModels,
    /// Bytes per element of the UNet's weights and activations: 4 (f32), or 2 in mixed
    /// precision (`precision = "f16"`; trained tensors keep f32 masters and optimiser state).
    pub unet_elem_bytes: u64,
    /// The optimiser, whose state per trained parameter differs (AdamW: two f32 moments).
    pub optimizer: OptimizerKind,
    /// Whether an EMA of the trained weights is kept (`ema_decay`): its f32 shadow and the
    /// host copy of the weights each update reads.
    pub ema: bool,
}

/// Which models besides the UNet are in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedModels {
    /// The text encoder.
    pub text_encoder: bool,
    /// The VAE.
    pub vae: bool,
}

impl Default for LoadedModels {
    /// Both (what the train stage loads).
    fn default() -> Self {
        Self {
            text_encoder: true,
            vae: true,
        }
    }
}

/// An estimated peak, by part, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MemoryEstimate {
    /// Weights of every model the stage loads.
    pub weights: u64,
    /// Trained parameters' gradients, their host copies and the optimiser's state.
    pub training_state: u64,
    /// Activations at the peak of the backward pass.
    pub activations: u64,
    /// Weight-sized buffers of a taped forward: on the CPU the host kernels keep a copy of
    /// every weight they use for the backward; elsewhere dfdx's backward computes gradients for
    /// the frozen weights it passes through.
    pub weight_copies: u64,
    /// The runtime's own memory (thread stacks, allocator arenas, gemm packing buffers).
    pub runtime: u64,
    /// The total.
    pub total: u64,
    /// Parameters that train.
    pub trainable_params: u64,
}

impl MemoryEstimate {
    /// `1.2 GiB (weights 0.5 GiB, training state 0.1 GiB, activations 0.6 GiB)`.
    pub fn describe(&self) -> String {
        use super::human_bytes;
        let mut parts = vec![
            format!("weights {}", human_bytes(self.weights)),
            format!("training state {}", human_bytes(self.training_state)),
            format!("activations {}", human_bytes(self.activations)),
        ];
        if self.weight_copies > 0 {
            parts.push(format!(
                "weight copies for the backward {}",
                human_bytes(self.weight_copies)
            ));
        }
        parts.push(format!("runtime {}", human_bytes(self.runtime)));
        format!("{} ({})", human_bytes(self.total), parts.join(", "))
    }
}

fn conv(i: usize, o: usize, k: usize) -> u64 {
    (i * o * k * k + o) as u64
}
fn linear(i: usize, o: usize, bias: bool) -> u64 {
    (i * o + if bias { o } else { 0 }) as u64
}
fn resnet(i: usize, o: usize, temb: Option<usize>) -> u64 {
    let mut n = 2 * i as u64 + conv(i, o, 3) + 2 * o as u64 + conv(o, o, 3);
    if let Some(t) = temb {
        n += linear(t, o, true);
    }
    if i != o {
        n += conv(i, o, 1);
    }
    n
}

/// Parameters of one SD transformer (`Transformer2D`) of width `c` with `blocks` blocks and a
/// context of width `ctx`.
fn transformer(c: usize, ctx: usize, blocks: usize) -> u64 {
    let block = 2 * c as u64                        // norm1
        + 3 * linear(c, c, false) + linear(c, c, true) // attn1
        + 2 * c as u64                              // norm2
        + linear(c, c, false) + 2 * linear(ctx, c, false) + linear(c, c, true) // attn2
        + 2 * c as u64                              // norm3
        + linear(c, 8 * c, true) + linear(4 * c, c, true); // GEGLU feed-forward
    2 * c as u64 + 2 * linear(c, c, true) + blocks as u64 * block
}

/// Parameters of one ResNet of the plan.
fn resnet_params(r: &ResnetConfig) -> u64 {
    resnet(r.in_channels, r.out_channels, r.temb_channels)
}

/// Parameters of one transformer of the plan.
fn transformer_params(t: &Transformer2DConfig) -> u64 {
    transformer(t.in_channels, t.context_dim, t.layers)
}

/// Parameters of the UNet `plan` (what `count_params` gives once it is loaded).
pub fn unet_params(plan: &UNetPlan) -> u64 {
    let (c0, temb) = (plan.base_channels, plan.temb_channels);
    let sampler = |present: bool, c: usize| if present { conv(c, c, 3) } else { 0 };
    let blocks = |resnets: &[ResnetConfig], attentions: &[Transformer2DConfig]| -> u64 {
        resnets.iter().map(resnet_params).sum::<u64>()
            + attentions.iter().map(transformer_params).sum::<u64>()
    };
    let down: u64 = (plan.down.iter())
        .map(|d| {
            blocks(&d.resnets, &d.attentions) + sampler(d.downsample_padding.is_some(), d.channels)
        })
        .sum();
    let mid = blocks(&plan.mid.resnets, std::slice::from_ref(&plan.mid.attention));
    let up: u64 = (plan.up.iter())
        .map(|u| blocks(&u.resnets, &u.attentions) + sampler(u.upsample, u.channels))
        .sum();
    conv(plan.in_channels, c0, 3)
        + linear(c0, temb, true)
        + linear(temb, temb, true)
        + down
        + mid
        + up
        + 2 * c0 as u64
        + conv(c0, plan.out_channels, 3)
}

/// Parameters of the VAE `c`.
pub fn vae_params(c: &VaeConfig) -> u64 {
    let ch = &c.block_out_channels;
    let n = ch.len();
    let z = c.latent_channels;
    let last = ch[n - 1];
    let mid = 2 * resnet(last, last, None)
        + if c.mid_block_add_attention {
            2 * last as u64 + 4 * linear(last, last, true)
        } else {
            0
        };
    // encoder
    let mut total = conv(c.in_channels, ch[0], 3);
    let mut prev = ch[0];
    for (i, &out) in ch.iter().enumerate() {
        for j in 0..c.layers_per_block {
            total += resnet(if j == 0 { prev } else { out }, out, None);
        }
        if i + 1 < n {
            total += conv(out, out, 3);
        }
        prev = out;
    }
    total += mid + 2 * last as u64 + conv(last, 2 * z, 3);
    // decoder
    total += conv(z, last, 3) + mid;
    let mut prev = last;
    for i in 0..n {
        let out = ch[n - 1 - i];
        for j in 0..=c.layers_per_block {
            total += resnet(if j == 0 { prev } else { out }, out, None);
        }
        if i + 1 < n {
            total += conv(out, out, 3);
        }
        prev = out;
    }
    total += 2 * ch[0] as u64 + conv(ch[0], c.out_channels, 3);
    if c.use_quant_conv {
        total += conv(2 * z, 2 * z, 1);
    }
    if c.use_post_quant_conv {
        total += conv(z, z, 1);
    }
    total
}

/// Parameters of the text encoder `c`.
pub fn clip_params(c: &ClipConfig) -> u64 {
    let d = c.hidden_size;
    let layer = 4 * d as u64
        + 4 * linear(d, d, true)
        + linear(d, c.intermediate_size, true)
        + linear(c.intermediate_size, d, true);
    ((c.vocab_size + c.max_position_embeddings) * d) as u64
        + c.num_hidden_layers as u64 * layer
        + 2 * d as u64
}

/// Parameters of rank-`rank` LoRA adapters on the UNet's linear and convolution layers whose
/// path ends with one of `targets` (`to_q`, `attn2.to_k`, `ff.net.2`, `conv1`…):
/// `rank · (out + in·kh·kw)` each.
pub fn unet_lora_params(plan: &UNetPlan, rank: usize, targets: &[String]) -> u64 {
    let wanted = |name: &str| targets.iter().any(|t| name.ends_with(&format!(".{t}")));
    (plan.weight_shapes().iter())
        .filter(|(name, _)| wanted(name))
        .map(|(_, shape)| (rank * (shape[0] + shape[1..].iter().product::<usize>())) as u64)
        .sum()
}

/// Values of the UNet weights whose paths end with one of `targets` (what full-size updates
/// of those layers hold).
pub fn unet_target_weights(plan: &UNetPlan, targets: &[String]) -> u64 {
    let wanted = |name: &str| targets.iter().any(|t| name.ends_with(&format!(".{t}")));
    (plan.weight_shapes().iter())
        .filter(|(name, _)| wanted(name))
        .map(|(_, shape)| shape.iter().product::<usize>() as u64)
        .sum()
}

/// Values of the text encoder's weights whose paths end with one of `targets`.
pub fn clip_target_weights(c: &ClipConfig, targets: &[String]) -> u64 {
    let (d, i) = (c.hidden_size, c.intermediate_size);
    let layer: usize = [
        ("self_attn.q_proj", d * d),
        ("self_attn.k_proj", d * d),
        ("self_attn.v_proj", d * d),
        ("self_attn.out_proj", d * d),
        ("mlp.fc1", i * d),
        ("mlp.fc2", d * i),
    ]
    .iter()
    .filter(|(name, _)| {
        let path = format!(".{name}");
        targets.iter().any(|t| path.ends_with(&format!(".{t}")))
    })
    .map(|&(_, n)| n)
    .sum();
    (c.num_hidden_layers * layer) as u64
}

/// Parameters of rank-`rank` LoRA adapters on the text encoder's layers whose paths end with one
/// of `targets`: per layer `self_attn.{q,k,v,out}_proj` (`[d, d]`), `mlp.fc1` (`[i, d]`) and
/// `mlp.fc2` (`[d, i]`), the modules its LoRA walker offers.
pub fn clip_lora_params(c: &ClipConfig, rank: usize, targets: &[String]) -> u64 {
    let (d, i) = (c.hidden_size, c.intermediate_size);
    let layer: usize = [
        ("self_attn.q_proj", d, d),
        ("self_attn.k_proj", d, d),
        ("self_attn.v_proj", d, d),
        ("self_attn.out_proj", d, d),
        ("mlp.fc1", i, d),
        ("mlp.fc2", d, i),
    ]
    .iter()
    .filter(|(name, ..)| {
        let path = format!(".{name}");
        targets.iter().any(|t| path.ends_with(&format!(".{t}")))
    })
    .map(|&(_, out, inp)| rank * (out + inp))
    .sum();
    (c.num_hidden_layers * layer) as u64
}

/// Values per element of a checkpointed block's input: the saved input, and its gradient,
/// which stays in dfdx's gradient map to the end of the backward pass.
const SAVED_INPUT: u64 = 2;

/// An attention call as `(heads, queries, keys)`.
type AttentionCall = (u64, u64, u64);

/// What the UNet keeps for the backward, per sample at one latent size.
struct UnetKept {
    /// Values kept with every activation on the tape (attention probabilities apart).
    all: u64,
    /// Attention calls.
    calls: Vec<AttentionCall>,
    /// With gradient checkpointing: values kept outside the checkpointed blocks plus the
    /// blocks' saved inputs.
    checkpointed: u64,
    /// Each checkpointed block's own values and attention calls (one is recomputed at a time).
    blocks: Vec<(u64, Vec<AttentionCall>)>,
}

/// Values the UNet keeps for the backward per sample at latent size `h × w` (attention
/// probabilities apart), and the attention calls as `(heads, queries, keys)`.
fn unet_kept(plan: &UNetPlan, h: usize, w: usize) -> UnetKept {
    let positions = |level: usize| ((h >> level).max(1) * (w >> level).max(1)) as u64;
    let tokens = 77u64;
    // ResNet: input, norm1·SiLU, conv1, + time, norm2·SiLU, conv2, shortcut, sum.
    let resnet = |i: u64, o: u64, p: u64| (2 * i + 5 * o + if i != o { o } else { 0 }) * p;
    // Transformer: norm, proj_in and the layout copies around it, proj_out, residual (6);
    // per block 11 (self-attention: norm, q, k, v, their head copies, output, merge, to_out,
    // residual) + 6 (cross-attention on the query side) + 15 (norm, GEGLU 8c and 4c, out,
    // residual) channel-widths per position, and the cross-attention's k/v on the context.
    let transformer =
        |ch: u64, p: u64, blocks: u64| 6 * ch * p + blocks * (32 * ch * p + 4 * ch * tokens);
    let c0 = plan.base_channels as u64;
    let mut out = UnetKept {
        all: (plan.in_channels as u64 + c0) * positions(0),
        calls: Vec::new(),
        checkpointed: 0,
        blocks: Vec::new(),
    };
    out.checkpointed = out.all;
    // A value kept outside any checkpointed block.
    let outside = |out: &mut UnetKept, v: u64| {
        out.all += v;
        out.checkpointed += v;
    };
    let add_resnet = |out: &mut UnetKept, r: &ResnetConfig, p: u64| {
        let i = r.in_channels as u64;
        let kept = resnet(i, r.out_channels as u64, p);
        out.all += kept;
        out.checkpointed += SAVED_INPUT * i * p;
        out.blocks.push((kept, Vec::new()));
    };
    let attend = |out: &mut UnetKept, t: &Transformer2DConfig, level: usize| {
        let p = positions(level);
        let ch = t.in_channels as u64;
        let kept = transformer(ch, p, t.layers as u64);
        let heads = t.heads as u64;
        let mut calls = Vec::new();
        for _ in 0..t.layers {
            calls.push((heads, p, p));
            calls.push((heads, p, tokens));
        }
        out.all += kept;
        out.checkpointed += SAVED_INPUT * ch * p;
        out.calls.extend(&calls);
        out.blocks.push((kept, calls));
    };
    for (level, d) in plan.down.iter().enumerate() {
        for (j, r) in d.resnets.iter().enumerate() {
            add_resnet(&mut out, r, positions(level));
            if let Some(t) = d.attentions.get(j) {
                attend(&mut out, t, level);
            }
        }
        if d.downsample_padding.is_some() {
            outside(&mut out, d.channels as u64 * positions(level + 1));
        }
    }
    let deepest = plan.levels() - 1;
    add_resnet(&mut out, &plan.mid.resnets[0], positions(deepest));
    attend(&mut out, &plan.mid.attention, deepest);
    add_resnet(&mut out, &plan.mid.resnets[1], positions(deepest));
    for u in &plan.up {
        let p = positions(u.level);
        for (j, r) in u.resnets.iter().enumerate() {
            // the concatenated input is a new tensor
            outside(&mut out, r.in_channels as u64 * p);
            add_resnet(&mut out, r, p);
            if let Some(t) = u.attentions.get(j) {
                attend(&mut out, t, u.level);
            }
        }
        if u.upsample {
            // nearest upsampling, then the conv
            outside(&mut out, 2 * u.channels as u64 * positions(u.level - 1));
        }
    }
    outside(&mut out, (3 * c0 + plan.out_channels as u64) * positions(0));
    out
}

/// Values the text encoder keeps per sample (attention probabilities apart), and its attention
/// calls.
fn clip_kept(c: &ClipConfig) -> (u64, Vec<(u64, u64, u64)>) {
    let d = c.hidden_size as u64;
    let i = c.intermediate_size as u64;
    let n = c.max_position_embeddings as u64;
    // embeddings + per layer: ln1, q, k, v, head copies (3), output, merge, out_proj,
    // residual, ln2, fc1, activation, fc2, residual; final norm.
    let per_layer = (12 * d + 2 * i) * n;
    let kept = 2 * d * n + c.num_hidden_layers as u64 * per_layer + d * n;
    let calls = (0..c.num_hidden_layers)
        .map(|_| (c.num_attention_heads as u64, n, n))
        .collect();
    (kept, calls)
}

/// Values the VAE keeps for the backward per image of `h × w` pixels when it trains (encoder,
/// sampled latents, decoder: the ResNets and samplers as in the UNet, the mid-block attention),
/// and its attention calls.
fn vae_kept(c: &VaeConfig, h: usize, w: usize) -> (u64, Vec<(u64, u64, u64)>) {
    let ch = &c.block_out_channels;
    let n = ch.len();
    let positions = |level: usize| ((h >> level).max(1) * (w >> level).max(1)) as u64;
    let resnet = |i: u64, o: u64, p: u64| (2 * i + 4 * o + if i != o { o } else { 0 }) * p;
    let last = ch[n - 1] as u64;
    let deep = positions(n - 1);
    // ResNet, attention (norm, q, k, v, output, out projection, residual), ResNet
    let mid = 2 * resnet(last, last, deep)
        + if c.mid_block_add_attention {
            7 * last * deep
        } else {
            0
        };
    // one single-head attention in the encoder's mid block and one in the decoder's
    let calls = if c.mid_block_add_attention {
        vec![(1, deep, deep); 2]
    } else {
        Vec::new()
    };
    let mut kept = (c.in_channels as u64 + ch[0] as u64) * positions(0);
    let mut prev = ch[0] as u64;
    for (level, &out) in ch.iter().enumerate() {
        for _ in 0..c.layers_per_block {
            kept += resnet(prev, out as u64, positions(level));
            prev = out as u64;
        }
        if level + 1 < n {
            // padded input, then the strided conv
            kept += out as u64 * (positions(level) + positions(level + 1));
        }
    }
    let z = c.latent_channels as u64;
    kept += mid + (2 * last + 6 * z) * deep;
    kept += mid;
    let mut prev = last;
    for level in (0..n).rev() {
        let out = ch[level] as u64;
        for _ in 0..=c.layers_per_block {
            kept += resnet(prev, out, positions(level));
            prev = out;
        }
        if level > 0 {
            kept += 2 * out * positions(level - 1);
        }
    }
    kept += (3 * ch[0] as u64 + c.out_channels as u64) * positions(0);
    (kept, calls)
}

/// The estimated peak of a `pretrain` stage: the larger of its two phases, the VAE trained on
/// `vae_batch` images of `resolution` pixels, then the UNet and the text encoder on `batch`.
pub fn estimate_pretrain(
    configs: &StoredConfigs,
    vae_batch: usize,
    batch: usize,
    resolution: usize,
    device: &str,
) -> Result<MemoryEstimate, String> {
    let shape = |b: usize| TrainShape {
        batch: b,
        height: resolution,
        width: resolution,
        attention_chunk: crate::diffusion::nn::DEFAULT_ATTENTION_CHUNK,
        gradient_checkpointing: false,
        device: device.to_string(),
        loaded: LoadedModels::default(),
        unet_elem_bytes: 4,
        optimizer: OptimizerKind::AdamW,
        ema: false,
    };
    let diffusion = estimate_train(
        configs,
        &TrainedPart::FullUnet { text_encoder: true },
        &shape(batch),
    )?;
    let vae = vae_params(&configs.vae);
    let (kept, calls) = vae_kept(&configs.vae, resolution, resolution);
    let b = vae_batch as u64;
    let kept = b * kept + attention_kept(&calls, b, DEFAULT_CHUNK, device);
    let weights = diffusion.weights;
    let training_state = 5 * vae * F32;
    let activations = (kept as f64 * F32 as f64 * ACTIVATION_PEAK_FACTOR) as u64;
    let weight_copies = if device == "cpu" { vae * F32 } else { 0 };
    let vae_phase = MemoryEstimate {
        weights,
        training_state,
        activations,
        weight_copies,
        runtime: RUNTIME_OVERHEAD,
        total: weights + training_state + activations + weight_copies + RUNTIME_OVERHEAD,
        trainable_params: vae,
    };
    Ok(if vae_phase.total > diffusion.total {
        vae_phase
    } else {
        diffusion
    })
}

/// Attention probability values kept per step for `calls` at batch `b` on `device`.
fn attention_kept(calls: &[(u64, u64, u64)], b: u64, chunk: u64, device: &str) -> u64 {
    calls
        .iter()
        .map(|&(heads, q, k)| {
            let all = b * heads * q * k;
            if device == "cpu" {
                if all <= CPU_MAX_KEPT_PROBS {
                    all
                } else {
                    // recomputed in the backward: one chunk of one head at a time
                    chunk.min(q) * k
                }
            } else {
                // scores, scaled scores and probabilities of every chunk stay on the tape
                3 * all
            }
        })
        .sum()
}

/// The estimated peak memory of one training step of `part` on the models `configs` at
/// `shape`. Every model of the checkpoint is loaded (the train stage loads the pipeline
/// whole); the training state is, per trained parameter, dfdx's gradient, the step loop's
/// host copy of it, a second host copy (DreamBooth's class batch under prior preservation, or
/// the next micro-batch's with gradient accumulation; counted always, so the estimate stays on
/// the safe side) and the optimiser's state ([`OptimizerKind::state_floats_per_param`]:
/// AdamW's two moments, …). An error says why the UNet's config cannot be laid out.
pub fn estimate_train(
    configs: &StoredConfigs,
    part: &TrainedPart,
    shape: &TrainShape,
) -> Result<MemoryEstimate, String> {
    let plan = UNetPlan::new(&configs.unet).map_err(|reason| format!("UNet config: {reason}"))?;
    let unet = unet_params(&plan);
    let te = clip_params(&configs.text_encoder);
    let vae = vae_params(&configs.vae);
    let ub = shape.unet_elem_bytes.max(1);
    let weights = unet * ub
        + (if shape.loaded.text_encoder { te } else { 0 } + if shape.loaded.vae { vae } else { 0 })
            * F32;
    let trainable = match part {
        TrainedPart::Lora {
            rank,
            targets,
            text_encoder,
            method,
        } => {
            let te = (text_encoder.as_deref())
                .map(|t| clip_lora_params(&configs.text_encoder, *rank, t))
                .unwrap_or(0);
            let lora = unet_lora_params(&plan, *rank, targets) + te;
            // LoHa holds two LoRA-sized pairs; LoKr's factors are smaller than a LoRA's
            if *method == crate::train::Method::Loha {
                2 * lora
            } else {
                lora
            }
        }
        TrainedPart::TextualInversion { vectors } => {
            (*vectors * configs.text_encoder.hidden_size) as u64
        }
        TrainedPart::FullUnet { text_encoder } => unet + if *text_encoder { te } else { 0 },
        TrainedPart::Hypernetwork { params } => *params as u64,
    };
    // dfdx gradient + 2 host copies + the optimiser's state (+ the f32 masters of LoRA's
    // adapters, + the EMA's shadow and the weights' copy it reads)
    let copies = if matches!(part, TrainedPart::Lora { .. }) {
        4.0
    } else {
        3.0
    } + shape.optimizer.state_floats_per_param()
        + if shape.ema { 2.0 } else { 0.0 };
    // mixed-precision full fine-tuning keeps an f32 master UNet beside the f16 one
    let masters = match part {
        TrainedPart::FullUnet { .. } if ub < 4 => unet * F32,
        _ => 0,
    };
    // LoHa, LoKr and DoRA act through a full-size ΔW per adapted layer: it and its gradient
    // in the UNet's element type, and on the host ΔW, its gradient and the frozen weight
    let full_size = match part {
        TrainedPart::Lora {
            method:
                crate::train::Method::Loha | crate::train::Method::Lokr | crate::train::Method::Dora,
            targets,
            text_encoder,
            ..
        } => {
            let te = (text_encoder.as_deref())
                .map(|t| clip_target_weights(&configs.text_encoder, t))
                .unwrap_or(0);
            (unet_target_weights(&plan, targets) + te) * (2 * ub + 3 * F32)
        }
        _ => 0,
    };
    let training_state = (copies * (trainable * F32) as f64).ceil() as u64 + masters + full_size;

    let f = configs.vae.downsampling_factor().max(1);
    let (h, w) = (shape.height / f, shape.width / f);
    let b = shape.batch as u64;
    let chunk = shape.attention_chunk.max(1) as u64;
    let unet_kept = unet_kept(&plan, h, w);
    let unet_kept_elems = if shape.gradient_checkpointing {
        // The blocks' inputs, and one block recomputed at a time in the backward pass.
        let largest = unet_kept
            .blocks
            .iter()
            .map(|(k, calls)| b * k + attention_kept(calls, b, chunk, &shape.device))
            .max()
            .unwrap_or(0);
        b * unet_kept.checkpointed + largest
    } else {
        b * unet_kept.all + attention_kept(&unet_kept.calls, b, chunk, &shape.device)
    };
    let text_encoder_taped = matches!(
        part,
        TrainedPart::TextualInversion { .. }
            | TrainedPart::FullUnet { text_encoder: true }
            | TrainedPart::Lora {
                text_encoder: Some(_),
                ..
            }
    );
    // the UNet's activations in its element type, the text encoder's in f32
    let mut kept_bytes = unet_kept_elems * ub;
    if text_encoder_taped {
        let (te_kept, te_calls) = clip_kept(&configs.text_encoder);
        kept_bytes += (b * te_kept + attention_kept(&te_calls, b, chunk, &shape.device)) * F32;
    }
    let activations = (kept_bytes as f64 * ACTIVATION_PEAK_FACTOR) as u64;
    // The weights a taped forward passes through: the UNet's, and the text encoder's when it
    // runs under the tape. On the CPU each host kernel keeps a copy of its weight for the
    // backward; dfdx's generic matmul/conv backward instead computes a gradient for every
    // weight, frozen or not (the trained ones are counted in the training state). Gradient
    // checkpointing drops the UNet's with each block's forward tape; the recomputation brings
    // one block's back, with its transients: an eighth of the UNet covers SD 1.5's largest
    // blocks (measured: 0.22–0.28 GiB above the rest at 128–256 px).
    let unet_taped = if shape.gradient_checkpointing {
        unet / 8
    } else {
        unet
    };
    let taped_bytes = unet_taped * ub + if text_encoder_taped { te * F32 } else { 0 };
    let weight_copies = if shape.device == "cpu" {
        taped_bytes
    } else {
        let frozen = match part {
            TrainedPart::FullUnet { .. } => 0,
            _ => taped_bytes,
        };
        // Off the CPU, a checkpointed block hands its parameters' gradients back through a
        // dfdx product whose two operand-sized gradient buffers stay in the map
        // (`nn::checkpoint`): two more copies of what trains.
        let handed_back = if shape.gradient_checkpointing {
            2 * trainable * ub
        } else {
            0
        };
        frozen + handed_back
    };
    let runtime = RUNTIME_OVERHEAD;
    Ok(MemoryEstimate {
        weights,
        training_state,
        activations,
        weight_copies,
        runtime,
        total: weights + training_state + activations + weight_copies + runtime,
        trainable_params: trainable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::UNetConfig;

    fn sd15_plan() -> UNetPlan {
        UNetPlan::new(&UNetConfig::default()).unwrap()
    }

    /// SD 1.5's published parameter counts.
    #[test]
    fn sd15_parameter_counts() {
        assert_eq!(unet_params(&sd15_plan()), 859_520_964);
        assert_eq!(vae_params(&VaeConfig::default()), 83_653_863);
        assert_eq!(clip_params(&ClipConfig::default()), 123_060_480);
        // kohya/PEFT: rank-16 LoRA on to_q/k/v/out of SD 1.5's UNet has 3.19 M parameters
        let targets: Vec<String> = ["to_q", "to_k", "to_v", "to_out.0"]
            .map(String::from)
            .to_vec();
        assert_eq!(unet_lora_params(&sd15_plan(), 16, &targets), 3_188_736);
    }

    fn sd15() -> StoredConfigs {
        StoredConfigs {
            unet: UNetConfig::default(),
            vae: VaeConfig::default(),
            text_encoder: ClipConfig::default(),
        }
    }

    fn shape(batch: usize, side: usize, device: &str) -> TrainShape {
        TrainShape {
            batch,
            height: side,
            width: side,
            attention_chunk: 1024,
            gradient_checkpointing: false,
            device: device.into(),
            loaded: LoadedModels::default(),
            unet_elem_bytes: 4,
            optimizer: OptimizerKind::AdamW,
            ema: false,
        }
    }

    /// Checkpointing keeps the blocks' inputs and one block's activations: far less than every
    /// activation at SD 1.5's 512 px, and it never changes the weights or the training state.
    #[test]
    fn gradient_checkpointing_cuts_the_activations() {
        let lora = TrainedPart::Lora {
            rank: 16,
            targets: ["to_q", "to_k", "to_v", "to_out.0"]
                .map(String::from)
                .to_vec(),
            text_encoder: None,
            method: crate::train::Method::Lora,
        };
        for device in ["cpu", "cuda:0"] {
            let plain = estimate_train(&sd15(), &lora, &shape(4, 512, device)).unwrap();
            let mut s = shape(4, 512, device);
            s.gradient_checkpointing = true;
            let ckpt = estimate_train(&sd15(), &lora, &s).unwrap();
            assert_eq!(plain.weights, ckpt.weights);
            assert_eq!(plain.training_state, ckpt.training_state);
            assert!(
                ckpt.activations * 3 < plain.activations,
                "{device}: {} vs {}",
                ckpt.describe(),
                plain.describe()
            );
        }
    }

    /// The training state counts the optimiser's: full fine-tuning of SD 1.5 holds AdamW's two
    /// f32 moments (8 bytes per parameter), about a quarter of that in 8 bits, one moment with
    /// Lion, four tensors with Prodigy; only the state changes.
    #[test]
    fn the_training_state_counts_each_optimizer() {
        let full = TrainedPart::FullUnet {
            text_encoder: false,
        };
        let with = |optimizer| {
            let mut s = shape(1, 512, "cpu");
            s.optimizer = optimizer;
            estimate_train(&sd15(), &full, &s).unwrap()
        };
        let adamw = with(OptimizerKind::AdamW);
        let per_param = |e: &MemoryEstimate| {
            (e.training_state as f64 - adamw.training_state as f64) / e.trainable_params as f64
        };
        for (kind, bytes) in [
            (OptimizerKind::AdamW8bit, -8.0 + 2.0 + 8.0 / 256.0),
            (OptimizerKind::Lion, -4.0),
            (OptimizerKind::Prodigy, 8.0),
            (OptimizerKind::ScheduleFreeAdamW, 0.0),
        ] {
            let e = with(kind);
            assert_eq!(e.weights, adamw.weights);
            assert_eq!(e.activations, adamw.activations);
            assert!(
                (per_param(&e) - bytes).abs() < 1e-3,
                "{kind}: {} bytes per parameter more than AdamW, expected {bytes}",
                per_param(&e)
            );
        }
        assert!(with(OptimizerKind::Adafactor).training_state < adamw.training_state);
        // An EMA adds its f32 shadow and the copy of the weights each update reads.
        let mut s = shape(1, 512, "cpu");
        s.ema = true;
        let ema = estimate_train(&sd15(), &full, &s).unwrap();
        assert!((per_param(&ema) - 8.0).abs() < 1e-3, "{}", per_param(&ema));
    }

    /// The counts equal what the loaded tiny fixture model holds.
    #[test]
    fn tiny_parameter_counts_match_the_loaded_models() {
        use crate::diffusion::Checkpoint;
        use crate::diffusion::params::count_params;
        use dfdx::prelude::*;
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");
        let ckpt = Checkpoint::open(dir).unwrap();
        let dev = Cpu::default();
        let c = ckpt.configs();
        let mut unet = ckpt.load_unet(&dev).unwrap();
        let mut vae = ckpt.load_vae(&dev).unwrap();
        let mut te = ckpt.load_text_encoder(&dev).unwrap();
        assert_eq!(
            unet_params(&UNetPlan::new(&c.unet).unwrap()),
            count_params(&mut unet) as u64
        );
        assert_eq!(vae_params(&c.vae), count_params(&mut vae) as u64);
        assert_eq!(clip_params(&c.text_encoder), count_params(&mut te) as u64);
        // the plan's layers are the model's, shape for shape
        let plan = UNetPlan::new(&c.unet).unwrap();
        let mut shapes = crate::train::lora::lora_modules(&mut unet);
        let mut planned = plan.weight_shapes();
        shapes.sort();
        planned.sort();
        assert_eq!(planned, shapes);
        let targets: Vec<String> = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "ff.net.2"]
            .map(String::from)
            .to_vec();
        let mut lora = 0u64;
        for (name, shape) in &shapes {
            if targets.iter().any(|t| name.ends_with(&format!(".{t}"))) {
                lora += (3 * (shape[0] + shape[1..].iter().product::<usize>())) as u64;
            }
        }
        assert_eq!(unet_lora_params(&plan, 3, &targets), lora);
        // and the text encoder's, for its default targets and the MLP
        for targets in [
            vec!["q_proj", "k_proj", "v_proj", "out_proj"],
            vec!["q_proj", "mlp.fc1", "fc2"],
        ] {
            let targets: Vec<String> = targets.into_iter().map(String::from).collect();
            let loaded: usize = (crate::train::lora::lora_modules(&mut te).iter())
                .filter(|(n, _)| targets.iter().any(|t| n.ends_with(&format!(".{t}"))))
                .map(|(_, s)| 3 * (s[0] + s[1]))
                .sum();
            assert_eq!(
                clip_lora_params(&c.text_encoder, 3, &targets),
                loaded as u64
            );
        }
    }

    #[test]
    fn the_estimate_grows_with_batch_and_resolution() {
        let lora = TrainedPart::Lora {
            rank: 4,
            targets: vec!["to_q".into(), "to_v".into()],
            text_encoder: None,
            method: crate::train::Method::Lora,
        };
        for part in [
            lora,
            TrainedPart::FullUnet {
                text_encoder: false,
            },
            TrainedPart::TextualInversion { vectors: 2 },
        ] {
            for device in ["cpu", "cuda:0"] {
                let mut last = 0;
                for side in [64, 128, 256, 512, 768, 1024] {
                    let e = estimate_train(&sd15(), &part, &shape(1, side, device)).unwrap();
                    assert!(e.total > last, "{part:?} {device} {side}: {e:?}");
                    last = e.total;
                }
                let mut last = 0;
                for batch in [1, 2, 4, 8, 16] {
                    let e = estimate_train(&sd15(), &part, &shape(batch, 512, device)).unwrap();
                    assert!(e.total > last, "{part:?} {device} b{batch}: {e:?}");
                    last = e.total;
                }
            }
        }
    }

    /// The estimates of ref_bench.py's shapes (SD 1.5, 512 px), printed for
    /// docs/benchmarks.md; on a GPU the weight-sized terms dominate LoRA at batch 1.
    #[test]
    fn sd15_512_reference_shapes() {
        let targets: Vec<String> = ["to_q", "to_k", "to_v", "to_out.0"]
            .map(String::from)
            .to_vec();
        let lora = TrainedPart::Lora {
            rank: 16,
            targets,
            text_encoder: None,
            method: crate::train::Method::Lora,
        };
        let full = TrainedPart::FullUnet {
            text_encoder: false,
        };
        let ti = TrainedPart::TextualInversion { vectors: 1 };
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        for (device, ub) in [("cpu", 4), ("cuda:0", 4), ("cuda:0", 2)] {
            for (name, part, batch) in [
                ("lora", &lora, 1),
                ("lora", &lora, 4),
                ("lora", &lora, 8),
                ("full", &full, 1),
                ("full", &full, 4),
                ("ti", &ti, 4),
            ] {
                for checkpointing in [false, true] {
                    let mut s = shape(batch, 512, device);
                    s.gradient_checkpointing = checkpointing;
                    s.unet_elem_bytes = ub;
                    let e = estimate_train(&sd15(), part, &s).unwrap();
                    println!(
                        "{device} f{} {name} b{batch}{}: total {:.2} GiB = weights {:.2} + state {:.2} + activations {:.2} + weight copies {:.2}",
                        ub * 8,
                        if checkpointing {
                            " (checkpointing)"
                        } else {
                            ""
                        },
                        gib(e.total),
                        gib(e.weights),
                        gib(e.training_state),
                        gib(e.activations),
                        gib(e.weight_copies)
                    );
                    if name == "lora" && batch == 1 {
                        assert!(gib(e.total) < 24.0, "{e:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn pretrain_grows_with_both_batches() {
        let c = sd15();
        let base = estimate_pretrain(&c, 1, 1, 64, "cpu").unwrap().total;
        assert!(estimate_pretrain(&c, 1, 8, 64, "cpu").unwrap().total > base);
        // the result is the larger phase: the VAE's once its batch is large enough
        assert!(estimate_pretrain(&c, 64, 1, 64, "cpu").unwrap().total >= base);
        assert!(estimate_pretrain(&c, 512, 1, 64, "cpu").unwrap().total > base);
        assert!(estimate_pretrain(&c, 1, 1, 128, "cpu").unwrap().total > base);
    }

    #[test]
    fn full_training_needs_more_than_lora() {
        let s = shape(1, 512, "cpu");
        let lora = estimate_train(
            &sd15(),
            &TrainedPart::Lora {
                rank: 16,
                targets: vec!["to_q".into()],
                text_encoder: None,
                method: crate::train::Method::Lora,
            },
            &s,
        )
        .unwrap();
        let full = estimate_train(
            &sd15(),
            &TrainedPart::FullUnet {
                text_encoder: false,
            },
            &s,
        )
        .unwrap();
        assert!(full.total > lora.total + 4 * 859_520_964 * 4);
    }
}
