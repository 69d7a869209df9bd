//! The text side of a training step: the token ids and frozen text-encoder states of the
//! captions a micro-batch trains with. The items' own captions are encoded once before the
//! run; a caption that caption shaping made (shuffled, tags or all of it dropped) is tokenized
//! and encoded when its batch needs it, and not kept.

use std::collections::HashMap;

use anyhow::Context as _;
use dfdx::prelude::*;

use crate::diffusion::TextEncoder;
use crate::diffusion::nn::Tensor3;
use crate::diffusion::tokenizer::ClipTokenizer;

/// Where a micro-batch's text states come from.
pub struct TextInputs<'a, D: Device<f32>> {
    /// The frozen text encoder's states of the items' captions, `[1, 77, d]` each.
    pub contexts: &'a HashMap<String, Tensor3<D>>,
    /// Token ids of the items' captions.
    pub ids: &'a HashMap<String, Vec<u32>>,
    /// Text-encoder layers skipped from the end (diffusers' convention).
    pub clip_skip: usize,
    /// Tokenizes the captions that are not among the items' own (`None` when every caption
    /// a batch can hold is in `ids` and `contexts`, as in `sdpipe bench`).
    pub tokenizer: Option<&'a ClipTokenizer>,
    /// Encodes them when the text encoder is frozen (`None` when it trains: its states then
    /// come from the traced forward pass of the step itself).
    pub frozen_encoder: Option<&'a TextEncoder<D>>,
}

impl<D: Device<f32>> TextInputs<'_, D> {
    /// The token ids of `captions`, in order.
    pub fn batch_ids(&self, captions: &[String]) -> anyhow::Result<Vec<Vec<u32>>> {
        captions
            .iter()
            .map(|c| match self.ids.get(c) {
                Some(ids) => Ok(ids.clone()),
                None => self.tokenize(c),
            })
            .collect()
    }

    fn tokenize(&self, caption: &str) -> anyhow::Result<Vec<u32>> {
        let tokenizer = self
            .tokenizer
            .with_context(|| format!("no tokenizer for caption {caption:?}"))?;
        Ok(tokenizer.encode(caption)?.input_ids)
    }

    /// The frozen text encoder's states of `captions`, `[b, 77, d]`.
    pub fn batch_context(&self, captions: &[String]) -> anyhow::Result<Tensor3<D>> {
        let mut rows: Vec<Tensor3<D>> = Vec::with_capacity(captions.len());
        for caption in captions {
            let row = match self.contexts.get(caption) {
                Some(c) => c.clone(),
                None => {
                    let encoder = self.frozen_encoder.with_context(|| {
                        format!("no frozen text encoder to encode caption {caption:?}")
                    })?;
                    encoder.encode(&[self.tokenize(caption)?], self.clip_skip)?
                }
            };
            rows.push(row);
        }
        let first = rows
            .first()
            .context("an empty micro-batch has no captions")?;
        let (_, n, d) = *first.shape();
        let dev = first.device().clone();
        let data: Vec<f32> = rows.iter().flat_map(|t| t.as_vec()).collect();
        Ok(dev.tensor_from_vec(data, (rows.len(), n, d)))
    }
}
