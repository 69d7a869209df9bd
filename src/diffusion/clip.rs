//! CLIP text encoder (transformers' `CLIPTextModel`): token + position embeddings, pre-LN
//! transformer layers with causal self-attention and a quick-GELU MLP, final layer norm.

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use super::error::{DiffusionError, Result};
use super::nn::weights::Loader;
use super::nn::{
    DEFAULT_ATTENTION_CHUNK, LayerNorm, Linear, Tensor2, Tensor3, gelu, merge_heads, quick_gelu,
    scaled_dot_product_attention, split_heads,
};
use super::params::{Layer, Layers, join};

/// Activation of the CLIP MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    /// `x · sigmoid(1.702 x)` (OpenAI CLIP, SD 1.x).
    QuickGelu,
    /// Exact erf GELU.
    Gelu,
}

/// Text encoder configuration (transformers `CLIPTextConfig` fields). Defaults are SD 1.5's
/// CLIP ViT-L/14 text tower.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct ClipConfig {
    /// Token vocabulary size (49408).
    pub vocab_size: usize,
    /// Width of the hidden states (768).
    pub hidden_size: usize,
    /// Width of the MLP (3072).
    pub intermediate_size: usize,
    /// Number of transformer layers (12).
    pub num_hidden_layers: usize,
    /// Attention heads per layer (12).
    pub num_attention_heads: usize,
    /// Maximum sequence length (77).
    pub max_position_embeddings: usize,
    /// Layer-norm epsilon (1e-5).
    pub layer_norm_eps: f64,
    /// MLP activation (`quick_gelu`).
    pub hidden_act: ClipActivation,
    /// End-of-text token, whose position gives the pooled output (49407).
    pub eos_token_id: u32,
}

impl Default for ClipConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            layer_norm_eps: 1e-5,
            hidden_act: ClipActivation::QuickGelu,
            eos_token_id: 49407,
        }
    }
}

/// Multi-head self-attention of a CLIP layer (biased q/k/v/out projections).
#[derive(Debug, Clone)]
pub struct ClipAttention<D: Storage<f32>> {
    /// Query projection.
    pub q_proj: Linear<D>,
    /// Key projection.
    pub k_proj: Linear<D>,
    /// Value projection.
    pub v_proj: Linear<D>,
    /// Output projection.
    pub out_proj: Linear<D>,
    /// Number of heads.
    pub heads: usize,
}

impl<D: Device<f32>> ClipAttention<D> {
    fn load(l: &Loader<D>, c: &ClipConfig) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            q_proj: Linear::load(&l.pp("q_proj"), d, d, true)?,
            k_proj: Linear::load(&l.pp("k_proj"), d, d, true)?,
            v_proj: Linear::load(&l.pp("v_proj"), d, d, true)?,
            out_proj: Linear::load(&l.pp("out_proj"), d, d, true)?,
            heads: c.num_attention_heads,
        })
    }

    /// Causal self-attention `[b, n, d] -> [b, n, d]`.
    pub fn forward<T: Tape<f32, D>>(&self, x: Tensor3<D, T>) -> Tensor3<D, T> {
        // [b, heads, n, d/heads]
        let q = split_heads(self.q_proj.forward(x.retaped::<T>()), self.heads);
        let k = split_heads(self.k_proj.forward(x.retaped::<T>()), self.heads);
        let v = split_heads(self.v_proj.forward(x), self.heads);
        let o = scaled_dot_product_attention(q, k, v, true, DEFAULT_ATTENTION_CHUNK);
        self.out_proj.forward(merge_heads(o))
    }
}

/// One pre-LN transformer layer.
#[derive(Debug, Clone)]
pub struct ClipEncoderLayer<D: Storage<f32>> {
    /// Norm before attention.
    pub layer_norm1: LayerNorm<D>,
    /// Causal self-attention.
    pub self_attn: ClipAttention<D>,
    /// Norm before the MLP.
    pub layer_norm2: LayerNorm<D>,
    /// MLP input projection.
    pub fc1: Linear<D>,
    /// MLP output projection.
    pub fc2: Linear<D>,
    /// MLP activation.
    pub act: ClipActivation,
}

impl<D: Device<f32>> ClipEncoderLayer<D> {
    fn load(l: &Loader<D>, c: &ClipConfig) -> Result<Self> {
        let (d, i) = (c.hidden_size, c.intermediate_size);
        Ok(Self {
            layer_norm1: LayerNorm::load(&l.pp("layer_norm1"), d, c.layer_norm_eps)?,
            self_attn: ClipAttention::load(&l.pp("self_attn"), c)?,
            layer_norm2: LayerNorm::load(&l.pp("layer_norm2"), d, c.layer_norm_eps)?,
            fc1: Linear::load(&l.pp("mlp").pp("fc1"), d, i, true)?,
            fc2: Linear::load(&l.pp("mlp").pp("fc2"), i, d, true)?,
            act: c.hidden_act,
        })
    }

    /// `[b, n, d] -> [b, n, d]`
    pub fn forward<T: Tape<f32, D>>(&self, x: Tensor3<D, T>) -> Tensor3<D, T> {
        let h = self
            .self_attn
            .forward(self.layer_norm1.forward(x.retaped::<T>()));
        let x = h + x;
        let h = self.fc1.forward(self.layer_norm2.forward(x.retaped::<T>()));
        let h = match self.act {
            ClipActivation::QuickGelu => quick_gelu(h),
            ClipActivation::Gelu => gelu(h),
        };
        self.fc2.forward(h) + x
    }
}

/// The outputs transformers' `CLIPTextModel` gives, for token-id input.
#[derive(Debug, Clone)]
pub struct TextEncoderOutput<D: Storage<f32>> {
    /// `[b, n, d]`: last layer's hidden states after the final layer norm (what SD conditions on).
    pub last_hidden_state: Tensor3<D>,
    /// `[b, d]`: `last_hidden_state` at the first end-of-text token of each sequence.
    pub pooler_output: Tensor2<D>,
    /// `[b, n, d]`: the penultimate layer's hidden states after the final layer norm
    /// (diffusers `clip_skip=1`, A1111 "CLIP skip 2").
    pub penultimate_hidden_state_final_ln: Tensor3<D>,
}

/// The CLIP text encoder.
#[derive(Debug, Clone)]
pub struct TextEncoder<D: Storage<f32>> {
    /// `[vocab, d]` token embedding table.
    pub token_embedding: Tensor2<D>,
    /// `[positions, d]` position embedding table.
    pub position_embedding: Tensor2<D>,
    /// Transformer layers.
    pub layers: Vec<ClipEncoderLayer<D>>,
    /// Final layer norm.
    pub final_layer_norm: LayerNorm<D>,
    /// Whether the token and position embedding tables get gradients under a tape (full
    /// fine-tuning of the text encoder).
    pub embeddings_trainable: bool,
    /// The configuration the weights were loaded for.
    pub config: ClipConfig,
}

impl<D: Device<f32>> TextEncoder<D> {
    /// Loads the text encoder from diffusers/transformers names without the `text_model.`
    /// prefix (`embeddings.token_embedding.weight`, `encoder.layers.0…`, `final_layer_norm…`).
    pub fn load(l: &Loader<D>, config: &ClipConfig) -> Result<Self> {
        let c = config;
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(DiffusionError::Input {
                model: "TextEncoder",
                reason: format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    c.hidden_size, c.num_attention_heads
                ),
            });
        }
        let emb = l.pp("embeddings");
        let layers = (0..c.num_hidden_layers)
            .map(|i| ClipEncoderLayer::load(&l.pp("encoder").pp("layers").pp(i), c))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: emb
                .pp("token_embedding")
                .tensor2("weight", (c.vocab_size, c.hidden_size))?,
            position_embedding: emb
                .pp("position_embedding")
                .tensor2("weight", (c.max_position_embeddings, c.hidden_size))?,
            layers,
            final_layer_norm: LayerNorm::load(
                &l.pp("final_layer_norm"),
                c.hidden_size,
                c.layer_norm_eps,
            )?,
            embeddings_trainable: false,
            config: c.clone(),
        })
    }

    fn check_ids(&self, ids: &[Vec<u32>], extra: usize) -> Result<(usize, usize)> {
        let err = |reason: String| DiffusionError::Input {
            model: "TextEncoder",
            reason,
        };
        let b = ids.len();
        let n = ids.first().map(|r| r.len()).unwrap_or(0);
        if b == 0 || n == 0 {
            return Err(err("no token ids".into()));
        }
        if ids.iter().any(|r| r.len() != n) {
            return Err(err("token id rows have different lengths".into()));
        }
        if n > self.config.max_position_embeddings {
            return Err(err(format!(
                "{n} tokens, more than the {} positions",
                self.config.max_position_embeddings
            )));
        }
        let vocab = self.token_embedding.shape().0 + extra;
        if let Some(bad) = ids.iter().flatten().find(|&&i| i as usize >= vocab) {
            return Err(err(format!(
                "token id {bad} outside the vocabulary of {vocab}"
            )));
        }
        Ok((b, n))
    }

    /// Looks up the token embeddings of `ids` (`b` rows of `n` ids): `[b, n, d]`. Textual
    /// inversion replaces rows of this before [`TextEncoder::forward_embeds`].
    pub fn embed_tokens(&self, ids: &[Vec<u32>]) -> Result<Tensor3<D>> {
        let (b, n) = self.check_ids(ids, 0)?;
        let flat: Vec<usize> = ids.iter().flatten().map(|&i| i as usize).collect();
        let idx = self.token_embedding.device().tensor_from_vec(flat, (b, n));
        Ok(self.token_embedding.clone().gather(idx))
    }

    /// [`TextEncoder::embed_tokens`] starting a tape (training): when the embeddings train,
    /// the table itself is on it, so its gradient comes back with the others.
    pub fn embed_tokens_traced(&self, ids: &[Vec<u32>]) -> Result<Tensor3<D, OwnedTape<f32, D>>> {
        if !self.embeddings_trainable {
            return Ok(self.embed_tokens(ids)?.leaky_trace());
        }
        let (b, n) = self.check_ids(ids, 0)?;
        let flat: Vec<usize> = ids.iter().flatten().map(|&i| i as usize).collect();
        let idx = self.token_embedding.device().tensor_from_vec(flat, (b, n));
        Ok(self.token_embedding.leaky_trace().gather(idx))
    }

    /// Token embeddings `[b, n, d]` where ids from `vocab_size` on index the rows of `extra`
    /// (`[k, d]`): the added tokens of textual inversion, numbered as diffusers does (49408,
    /// 49409, … for SD 1.x). Gradients flow to `extra` when it carries a tape; the table itself
    /// is not copied.
    pub fn embed_tokens_with_extra<T: Tape<f32, D>>(
        &self,
        ids: &[Vec<u32>],
        extra: Tensor2<D, T>,
    ) -> Result<Tensor3<D, T>> {
        let (k, d) = *extra.shape();
        if d != self.config.hidden_size {
            return Err(DiffusionError::Input {
                model: "TextEncoder",
                reason: format!(
                    "extra embeddings are {d} wide, the encoder is {}",
                    self.config.hidden_size
                ),
            });
        }
        let (b, n) = self.check_ids(ids, k)?;
        let vocab = self.token_embedding.shape().0;
        let dev = self.token_embedding.device().clone();
        let flat: Vec<usize> = ids.iter().flatten().map(|&i| i as usize).collect();
        let base_idx: Vec<usize> = flat
            .iter()
            .map(|&i| if i < vocab { i } else { 0 })
            .collect();
        let extra_idx: Vec<usize> = flat.iter().map(|&i| i.saturating_sub(vocab)).collect();
        let mask: Vec<f32> = flat.iter().map(|&i| (i >= vocab) as u8 as f32).collect();
        // [b, n, d]
        let base = self
            .token_embedding
            .clone()
            .gather(dev.tensor_from_vec(base_idx, (b, n)));
        let added: Tensor3<D, T> = extra.gather(dev.tensor_from_vec(extra_idx, (b, n)));
        let mask = dev
            .tensor_from_vec(mask, (b, n))
            .broadcast_like::<_, Axis<2>>(&(b, n, d));
        let keep = mask.clone().negate() + 1.0f32;
        Ok(added * mask + base * keep)
    }

    /// Runs the transformer on token embeddings `[b, n, d]` (position embeddings are added
    /// here) and returns the final-layer-normed hidden states of layer `L - clip_skip`
    /// (`clip_skip` as in diffusers: 0 = last layer, 1 = penultimate).
    pub fn forward_embeds<T: Tape<f32, D>>(
        &self,
        embeds: Tensor3<D, T>,
        clip_skip: usize,
    ) -> Result<Tensor3<D, T>> {
        let (b, n, d) = *embeds.shape();
        if d != self.config.hidden_size || n == 0 || n > self.config.max_position_embeddings {
            return Err(DiffusionError::Input {
                model: "TextEncoder",
                reason: format!(
                    "embeddings of shape [{b}, {n}, {d}], expected [b, <= {}, {}]",
                    self.config.max_position_embeddings, self.config.hidden_size
                ),
            });
        }
        if clip_skip >= self.layers.len() {
            return Err(DiffusionError::Input {
                model: "TextEncoder",
                reason: format!(
                    "clip_skip {clip_skip} leaves no layer of {}",
                    self.layers.len()
                ),
            });
        }
        let h = self.run_layers(embeds, self.layers.len() - clip_skip);
        Ok(self.final_layer_norm.forward(h))
    }

    /// Adds position embeddings and runs the first `count` layers (no final norm).
    fn run_layers<T: Tape<f32, D>>(&self, embeds: Tensor3<D, T>, count: usize) -> Tensor3<D, T> {
        let (b, n, d) = *embeds.shape();
        let mut h = if self.embeddings_trainable && T::OWNS_TAPE {
            // the table on the tape (one slice, used once: its assigning backward is exact)
            embeds
                + self
                    .position_embedding
                    .retaped::<T>()
                    .slice((0..n, ..))
                    .broadcast_like::<_, Axis<0>>(&(b, n, d))
        } else {
            embeds
                + self
                    .position_embedding
                    .clone()
                    .slice((0..n, ..))
                    .broadcast_like::<_, Axis<0>>(&(b, n, d))
        };
        for layer in &self.layers[..count] {
            h = layer.forward(h);
        }
        h
    }

    /// Encodes token ids (each row as long as the others, at most 77) to the hidden states SD
    /// conditions on: [`TextEncoder::forward_embeds`] of their embeddings.
    pub fn encode(&self, ids: &[Vec<u32>], clip_skip: usize) -> Result<Tensor3<D>> {
        let embeds = self.embed_tokens(ids)?;
        self.forward_embeds(embeds, clip_skip)
    }

    /// Everything transformers' `CLIPTextModel` returns that SD uses, in one pass.
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<TextEncoderOutput<D>> {
        let embeds = self.embed_tokens(ids)?;
        let (b, n, d) = *embeds.shape();
        let layers = self.layers.len();
        let penultimate = self.run_layers(embeds, layers.saturating_sub(1));
        let last = match self.layers.last() {
            Some(layer) => layer.forward(penultimate.clone()),
            None => penultimate.clone(),
        };
        let last = self.final_layer_norm.forward(last);
        let penultimate = self.final_layer_norm.forward(penultimate);
        // pooled: the hidden state at the first end-of-text token (transformers with a
        // configured eos id), falling back to the highest id
        let values = last.as_vec();
        let mut pooled = Vec::with_capacity(b * d);
        for (bi, row) in ids.iter().enumerate() {
            let pos = row
                .iter()
                .position(|&t| t == self.config.eos_token_id)
                .unwrap_or_else(|| {
                    row.iter()
                        .enumerate()
                        .max_by_key(|(_, t)| **t)
                        .map(|(i, _)| i)
                        .unwrap_or(0)
                });
            let start = (bi * n + pos) * d;
            pooled.extend_from_slice(&values[start..start + d]);
        }
        let pooler_output = self
            .token_embedding
            .device()
            .tensor_from_vec(pooled, (b, d));
        Ok(TextEncoderOutput {
            last_hidden_state: last,
            pooler_output,
            penultimate_hidden_state_final_ln: penultimate,
        })
    }
}

impl<D: Device<f32>> Layers<D> for TextEncoder<D> {
    /// Names as the text encoder's weights are stored, without `text_model.`.
    fn visit_layers(&mut self, prefix: &str, f: &mut dyn FnMut(&str, Layer<'_, D>)) {
        f(
            &join(prefix, "embeddings.token_embedding"),
            Layer::Embedding(&mut self.token_embedding),
        );
        f(
            &join(prefix, "embeddings.position_embedding"),
            Layer::Embedding(&mut self.position_embedding),
        );
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let base = join(prefix, format!("encoder.layers.{i}"));
            f(
                &format!("{base}.layer_norm1"),
                Layer::LayerNorm(&mut layer.layer_norm1),
            );
            let a = &mut layer.self_attn;
            f(
                &format!("{base}.self_attn.q_proj"),
                Layer::Linear(&mut a.q_proj),
            );
            f(
                &format!("{base}.self_attn.k_proj"),
                Layer::Linear(&mut a.k_proj),
            );
            f(
                &format!("{base}.self_attn.v_proj"),
                Layer::Linear(&mut a.v_proj),
            );
            f(
                &format!("{base}.self_attn.out_proj"),
                Layer::Linear(&mut a.out_proj),
            );
            f(
                &format!("{base}.layer_norm2"),
                Layer::LayerNorm(&mut layer.layer_norm2),
            );
            f(&format!("{base}.mlp.fc1"), Layer::Linear(&mut layer.fc1));
            f(&format!("{base}.mlp.fc2"), Layer::Linear(&mut layer.fc2));
        }
        f(
            &join(prefix, "final_layer_norm"),
            Layer::LayerNorm(&mut self.final_layer_norm),
        );
    }

    fn set_trainable(&mut self, on: bool) {
        self.embeddings_trainable = on;
        self.visit_layers("", &mut |_, mut layer| layer.set_trainable(on));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::nn::weights::WeightStore;

    #[test]
    fn other_architectures_and_clip_skip() {
        let dev = Cpu::default();
        let config = ClipConfig {
            vocab_size: 100,
            hidden_size: 24,
            intermediate_size: 40,
            num_hidden_layers: 3,
            num_attention_heads: 3,
            max_position_embeddings: 10,
            hidden_act: ClipActivation::Gelu,
            eos_token_id: 99,
            ..ClipConfig::default()
        };
        let store = WeightStore::synthetic(9);
        let te = TextEncoder::load(&Loader::new(&store, &dev), &config).unwrap();
        let ids = vec![
            vec![98, 5, 6, 7, 99, 99, 99],
            vec![98, 99, 99, 99, 99, 99, 99],
        ];
        let out = te.forward(&ids).unwrap();
        assert_eq!(*out.last_hidden_state.shape(), (2, 7, 24));
        assert_eq!(*out.pooler_output.shape(), (2, 24));
        // pooled = hidden state at the first eos
        let last = out.last_hidden_state.as_vec();
        let pooled = out.pooler_output.as_vec();
        assert_eq!(&pooled[..24], &last[4 * 24..5 * 24]);
        assert_eq!(&pooled[24..], &last[7 * 24 + 24..7 * 24 + 48]);
        let skip1 = te.encode(&ids, 1).unwrap().as_vec();
        assert_eq!(skip1, out.penultimate_hidden_state_final_ln.as_vec());
        assert!(te.encode(&ids, 3).is_err(), "clip_skip leaving no layer");
        assert!(te.encode(&[vec![1; 11]], 0).is_err(), "too many tokens");
        assert!(
            te.encode(&[vec![100]], 0).is_err(),
            "id outside the vocabulary"
        );

        // added tokens: ids 100 and 101 take the rows of `extra`, gradients reach them
        let extra: Tensor2<Cpu> = dev.sample_normal_like(&(2, 24));
        let ids = vec![vec![98, 5, 100, 101, 99]];
        let emb = te
            .embed_tokens_with_extra(&ids, extra.leaky_trace())
            .unwrap();
        let v = emb.as_vec();
        let table = te.token_embedding.as_vec();
        assert_eq!(&v[..24], &table[98 * 24..99 * 24]);
        assert_eq!(&v[2 * 24..4 * 24], &extra.as_vec()[..]);
        let g = te
            .forward_embeds(emb, 0)
            .unwrap()
            .square()
            .sum()
            .backward()
            .get(&extra)
            .as_vec();
        assert!(g.iter().all(|x| x.is_finite()) && g.iter().any(|x| *x != 0.0));
        assert!(te.embed_tokens_with_extra(&[vec![102]], extra).is_err());
    }
}
