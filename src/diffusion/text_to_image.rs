//! Text-to-image generation with classifier-free guidance, as diffusers'
//! `StableDiffusionPipeline.__call__` computes it:
//!
//! 1. the prompt and the negative prompt (`""` when none, as diffusers) are tokenized to 77 ids
//!    and encoded by the text encoder (optionally `clip_skip` layers from the end);
//! 2. the initial latents `[b, 4, H/f, W/f]` (f = the VAE's downsampling factor) are either
//!    given (diffusers' `latents` argument) or drawn from seeded noise, one seed per image
//!    (`seed`, `seed + 1`, … as A1111 does), then multiplied by the sampler's
//!    `init_noise_sigma`;
//! 3. for every timestep the UNet runs once on the batch `[uncond × b; cond × b]` (2b rows) at
//!    `scale_model_input(latents)`, the guided noise is `u + cfg · (c − u)`, and the sampler
//!    steps. With `cfg ≤ 1` diffusers skips guidance: the UNet runs on the `b` conditional rows
//!    only and its output is used as is;
//! 4. the VAE decodes `latents / scaling_factor`, and the image is `(x / 2 + 0.5).clamp(0, 1)`.
//!
//! The scheduler config comes from a diffusers folder's `scheduler/scheduler_config.json` when
//! there is one, else it is SD 1.5's. Stochastic samplers (Euler a) draw their per-step noise
//! from the same per-image generators as the initial latents, so image `i` of a batch is the
//! image a batch of one with seed `seed + i` gives (up to float rounding of the batched UNet).

use super::nn::elem::Elem;
use std::path::{Path, PathBuf};

use dfdx::prelude::*;

use super::checkpoint::{Checkpoint, CheckpointLayout, StableDiffusion};
use super::error::DiffusionError;
use super::nn::{Tensor3, Tensor4};
use super::schedulers::{NoiseSource, SamplerKind, SchedulerConfig, SchedulerError, SeededNoise};
use super::tokenizer::{ClipTokenizer, TokenizerError};

/// Errors of text-to-image generation.
#[derive(Debug, thiserror::Error)]
pub enum TextToImageError {
    /// A model failed to load or rejected its input.
    #[error(transparent)]
    Model(#[from] DiffusionError),
    /// The scheduler config or a sampler step failed.
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    /// The tokenizer failed to load or to tokenize a prompt.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A generation option has an unusable value. `option` is the field name of
    /// [`TextToImageOptions`] (`width`, `height`, `steps`, `cfg_scale`, `batch`, `clip_skip`)
    /// or `init_latents`; the command line shows it as `--width`, ….
    #[error("invalid {option}: {reason}")]
    InvalidOption {
        /// Which option.
        option: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },
}

/// Result alias of the pipeline.
pub type Result<T, E = TextToImageError> = std::result::Result<T, E>;

/// Settings of one text-to-image call. Defaults: empty prompts, the model's native size, 20
/// steps of Euler a, CFG 7.5, one image, seed 0, no clip skip.
#[derive(Debug, Clone, PartialEq)]
pub struct TextToImageOptions {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (`""` = none; diffusers then encodes the empty string).
    pub negative_prompt: String,
    /// Image width in pixels; `None` = the UNet's `sample_size` × the VAE factor (512 for SD
    /// 1.5). Must be a multiple of 8 and of [`TextToImage::size_multiple`].
    pub width: Option<usize>,
    /// Image height in pixels (same rules as `width`).
    pub height: Option<usize>,
    /// Number of sampling steps.
    pub steps: usize,
    /// Sampler.
    pub sampler: SamplerKind,
    /// Classifier-free guidance scale; `<= 1` disables guidance (as diffusers).
    pub cfg_scale: f32,
    /// Number of images generated together.
    pub batch: usize,
    /// Seed of the first image; image `i` uses `seed + i`.
    pub seed: u64,
    /// Text-encoder layers skipped from the end, diffusers' convention (0 = last layer, 1 =
    /// penultimate, which A1111 calls "Clip skip: 2"); the final layer norm is always applied.
    /// It applies to the prompt and the negative prompt alike, as in A1111; diffusers'
    /// `StableDiffusionPipeline` applies it to the prompt only (it encodes the negative prompt
    /// at the last layer), so with `clip_skip > 0` the two differ on purpose.
    pub clip_skip: usize,
}

impl Default for TextToImageOptions {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            width: None,
            height: None,
            steps: 20,
            sampler: SamplerKind::EulerAncestral,
            cfg_scale: 7.5,
            batch: 1,
            seed: 0,
            clip_skip: 0,
        }
    }
}

/// The settings a generation actually used (sizes resolved, per-image seeds).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationSettings {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt.
    pub negative_prompt: String,
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Sampling steps.
    pub steps: usize,
    /// Sampler.
    pub sampler: SamplerKind,
    /// Guidance scale.
    pub cfg_scale: f32,
    /// Number of images.
    pub batch: usize,
    /// Seed of each image (`seed + i`).
    pub seeds: Vec<u64>,
    /// Text-encoder layers skipped (diffusers' convention).
    pub clip_skip: usize,
    /// The UNet timesteps of the steps, in order.
    pub timesteps: Vec<f32>,
    /// Whether the initial latents were given rather than drawn from the seeds.
    pub init_latents_given: bool,
    /// Prompt tokens dropped because the prompt was longer than the text encoder takes.
    pub prompt_tokens_dropped: usize,
    /// Negative-prompt tokens dropped likewise.
    pub negative_tokens_dropped: usize,
}

/// What one text-to-image call returns.
#[derive(Debug, Clone)]
pub struct Generation<D: Storage<f32>> {
    /// Final latents `[b, c, H/f, W/f]` in the sampler's space (before division by the VAE
    /// scaling factor): diffusers' `output_type="latent"`.
    pub latents: Tensor4<D>,
    /// Images `[b, 3, H, W]` with values in [0, 1]: diffusers' `output_type="pt"`.
    pub images: Tensor4<D>,
    /// The settings used.
    pub settings: GenerationSettings,
}

impl<D: Device<f32>> Generation<D> {
    /// Channel-first pixels `[3, H, W]` of image `i` (for `render::rgb_image_from_chw`), or
    /// `None` past the batch.
    pub fn image_chw(&self, i: usize) -> Option<Vec<f32>> {
        let (b, c, h, w) = *self.images.shape();
        if i >= b {
            return None;
        }
        let plane = c * h * w;
        let all = self.images.as_vec();
        Some(all[i * plane..(i + 1) * plane].to_vec())
    }
}

/// Reported after every sampling step (for progress bars, previews, or tests that check the
/// intermediate latents).
#[derive(Debug)]
pub struct StepProgress<'a, D: Storage<f32>> {
    /// Index of the step just finished (0-based).
    pub step: usize,
    /// Total number of steps.
    pub num_steps: usize,
    /// The UNet timestep of this step.
    pub timestep: f32,
    /// The latents after this step `[b, c, H/f, W/f]`.
    pub latents: &'a Tensor4<D>,
}

/// Normal noise for a batch from one seeded generator per image: a buffer of `b` equal parts
/// gets part `i` from generator `i`, so each image's noise depends only on its own seed
/// (A1111's per-image RNG). A buffer that does not split into `b` parts is filled from the
/// first generator.
#[derive(Debug, Clone)]
pub struct BatchNoise {
    sources: Vec<SeededNoise>,
}

impl BatchNoise {
    /// Generators for seeds `seed, seed + 1, …, seed + batch − 1` (wrapping at `u64::MAX`).
    pub fn seeded(seed: u64, batch: usize) -> Self {
        Self {
            sources: (0..batch as u64)
                .map(|i| SeededNoise::new(seed.wrapping_add(i)))
                .collect(),
        }
    }

    /// Number of per-image generators.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// Whether there are no generators (a batch of 0).
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }
}

impl NoiseSource for BatchNoise {
    fn fill_normal(&mut self, out: &mut [f32]) {
        let n = self.sources.len();
        if n == 0 {
            out.fill(0.0);
        } else if out.len().is_multiple_of(n) {
            let part = out.len() / n;
            if part == 0 {
                return;
            }
            for (chunk, src) in out.chunks_mut(part).zip(&mut self.sources) {
                src.fill_normal(chunk);
            }
        } else {
            self.sources[0].fill_normal(out);
        }
    }
}

/// The tokenizer [`TextToImage::load_as`] uses for `ckpt`: `config_dir`'s, the diffusers
/// folder's own, or the bundled CLIP tokenizer for a single file.
pub fn tokenizer_for(ckpt: &Checkpoint, config_dir: Option<&Path>) -> Result<ClipTokenizer> {
    Ok(match (config_dir, ckpt.layout) {
        (Some(d), _) => ClipTokenizer::for_model(d)?,
        (None, CheckpointLayout::Diffusers) => ClipTokenizer::for_model(&ckpt.path)?,
        (None, CheckpointLayout::SingleFile) => ClipTokenizer::bundled()?,
    })
}

/// The scheduler config of a model folder: `scheduler/scheduler_config.json` when present
/// (any diffusers scheduler class; fields it lacks keep SD 1.5's values), else SD 1.5's.
pub fn scheduler_config_for(dir: &Path) -> Result<SchedulerConfig> {
    let file = dir.join("scheduler").join("scheduler_config.json");
    if file.is_file() {
        Ok(SchedulerConfig::from_json_file(&file)?)
    } else {
        Ok(SchedulerConfig::sd15())
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A loaded text-to-image pipeline: the three models, the tokenizer and the scheduler config.
#[derive(Debug, Clone)]
pub struct TextToImage<D: Storage<f32> + Storage<E>, E = f32> {
    /// Text encoder, UNet (computing in `E`) and VAE.
    pub models: StableDiffusion<D, E>,
    /// The CLIP tokenizer.
    pub tokenizer: ClipTokenizer,
    /// Scheduler config the samplers are built from.
    pub scheduler_config: SchedulerConfig,
    /// Textual-inversion vectors `[k, d]` for the token ids the tokenizer added past the text
    /// encoder's vocabulary, in id order (see [`TextToImage::add_embedding`]).
    pub extra_embeddings: Vec<f32>,
}

impl<D: Device<f32>> TextToImage<D> {
    /// Loads `ckpt` on `dev` (f32; see [`TextToImage::load_as`]).
    pub fn load(ckpt: &Checkpoint, config_dir: Option<&Path>, dev: &D) -> Result<Self> {
        Self::load_as(ckpt, config_dir, dev)
    }
}

impl<E: Elem, D: Device<f32> + Device<E>> TextToImage<D, E> {
    /// A pipeline from its parts.
    pub fn new(
        models: StableDiffusion<D, E>,
        tokenizer: ClipTokenizer,
        scheduler_config: SchedulerConfig,
    ) -> Self {
        Self {
            models,
            tokenizer,
            scheduler_config,
            extra_embeddings: Vec::new(),
        }
    }

    /// Loads `ckpt` on `dev`, the UNet computing in `E`. The tokenizer and the scheduler config come from `config_dir`
    /// when given (the folder a single file took its configs from), else from the checkpoint
    /// itself when it is a diffusers folder; otherwise the bundled CLIP tokenizer and SD 1.5's
    /// scheduler config are used.
    pub fn load_as(ckpt: &Checkpoint, config_dir: Option<&Path>, dev: &D) -> Result<Self> {
        let dir: Option<PathBuf> = match (config_dir, ckpt.layout) {
            (Some(d), _) => Some(d.to_path_buf()),
            (None, CheckpointLayout::Diffusers) => Some(ckpt.path.clone()),
            (None, CheckpointLayout::SingleFile) => None,
        };
        let (tokenizer, scheduler_config) = match &dir {
            Some(d) => (ClipTokenizer::for_model(d)?, scheduler_config_for(d)?),
            None => (ClipTokenizer::bundled()?, SchedulerConfig::sd15()),
        };
        Ok(Self::new(ckpt.load_as(dev)?, tokenizer, scheduler_config))
    }

    /// Pixels per latent along each axis (the VAE's downsampling factor: 8 for SD).
    pub fn vae_factor(&self) -> usize {
        self.models.vae.config.downsampling_factor()
    }

    /// What width and height must be multiples of: 8 and the model's total downsampling (the
    /// VAE factor times the UNet's `2^(levels − 1)`); 64 for SD 1.5.
    pub fn size_multiple(&self) -> usize {
        let total = self.total_downsampling();
        8 / gcd(8, total) * total
    }

    /// Pixels per position of the UNet's coarsest level: the VAE factor times `2^(levels − 1)`.
    pub fn total_downsampling(&self) -> usize {
        let levels = self.models.unet.config.block_out_channels.len();
        self.vae_factor() << levels.saturating_sub(1)
    }

    /// The native size (width, height): the UNet's `sample_size` × the VAE factor.
    pub fn default_size(&self) -> (usize, usize) {
        let s = self.models.unet.config.sample_size * self.vae_factor();
        (s, s)
    }

    /// Checks `options` against this model and returns the resolved (width, height).
    pub fn check_options(&self, options: &TextToImageOptions) -> Result<(usize, usize)> {
        let bad = |option: &'static str, reason: String| {
            Err(TextToImageError::InvalidOption { option, reason })
        };
        let (dw, dh) = self.default_size();
        let (width, height) = (options.width.unwrap_or(dw), options.height.unwrap_or(dh));
        let m = self.size_multiple();
        for (option, v) in [("width", width), ("height", height)] {
            if v == 0 || v % m != 0 {
                return bad(
                    option,
                    format!(
                        "{v} pixels; it must be a positive multiple of {m} (of 8 and of this \
                         model's total downsampling {})",
                        self.total_downsampling()
                    ),
                );
            }
        }
        let n = self.scheduler_config.num_train_timesteps;
        if options.steps == 0 || options.steps > n {
            return bad(
                "steps",
                format!("{}; it must be between 1 and {n}", options.steps),
            );
        }
        if !options.cfg_scale.is_finite() {
            return bad(
                "cfg_scale",
                format!("{} is not a finite number", options.cfg_scale),
            );
        }
        if options.batch == 0 {
            return bad("batch", "0; at least one image is needed".into());
        }
        let layers = self.models.text_encoder().layers.len();
        if options.clip_skip >= layers {
            return bad(
                "clip_skip",
                format!(
                    "{}; the text encoder has {layers} layers, so at most {} can be skipped",
                    options.clip_skip,
                    layers - 1
                ),
            );
        }
        Ok((width, height))
    }

    /// Encodes the text of a generation: `[uncond; cond]` `[2, n, d]` with guidance, `[cond]`
    /// `[1, n, d]` without. Returns the embeddings and the dropped-token counts.
    /// Adds a textual-inversion embedding: `token` becomes `vectors.len() / d` new token ids
    /// (A1111 and diffusers give a multi-vector token that many consecutive positions), whose
    /// input vectors are `vectors` (`[n, d]`, row-major). Returns the new ids.
    pub fn add_embedding(&mut self, token: &str, vectors: &[f32]) -> Result<Vec<u32>> {
        let d = self.models.text_encoder().config.hidden_size;
        if vectors.is_empty() || !vectors.len().is_multiple_of(d) {
            return Err(TextToImageError::InvalidOption {
                option: "embedding",
                reason: format!(
                    "the vectors of `{token}` hold {} values, not a whole number of {d}-wide vectors (this model's text width)",
                    vectors.len()
                ),
            });
        }
        let vocab = self.models.text_encoder().config.vocab_size as u32;
        let ids = self.tokenizer.add_placeholder(token, vectors.len() / d)?;
        for (i, id) in ids.iter().enumerate() {
            let row = (*id - vocab) as usize;
            if row * d != self.extra_embeddings.len() {
                return Err(TextToImageError::InvalidOption {
                    option: "embedding",
                    reason: format!("token `{token}` got id {id}, not the next free one"),
                });
            }
            self.extra_embeddings
                .extend_from_slice(&vectors[i * d..(i + 1) * d]);
        }
        Ok(ids)
    }

    /// The text-encoder states of `prompt` (`[1, 77, d]`), with any added embeddings.
    pub fn encode_prompt(&self, prompt: &str, clip_skip: usize) -> Result<Tensor3<D>> {
        let ids = self.tokenizer.encode(prompt)?.input_ids;
        self.encode_ids(&[ids], clip_skip)
    }

    fn encode_ids(&self, ids: &[Vec<u32>], clip_skip: usize) -> Result<Tensor3<D>> {
        let te = self.models.text_encoder();
        if self.extra_embeddings.is_empty() {
            return Ok(te.encode(ids, clip_skip)?);
        }
        let d = te.config.hidden_size;
        let dev = te.token_embedding.device().clone();
        let extra = dev.tensor_from_vec(
            self.extra_embeddings.clone(),
            (self.extra_embeddings.len() / d, d),
        );
        let embeds = te.embed_tokens_with_extra(ids, extra)?;
        Ok(te.forward_embeds(embeds, clip_skip)?)
    }

    fn encode_text(
        &self,
        options: &TextToImageOptions,
        guided: bool,
    ) -> Result<(Tensor3<D>, usize, usize)> {
        let cond = self.tokenizer.encode(&options.prompt)?;
        let uncond = self.tokenizer.encode(&options.negative_prompt)?;
        let (pd, nd) = (cond.dropped_tokens, uncond.dropped_tokens);
        let ids = if guided {
            vec![uncond.input_ids, cond.input_ids]
        } else {
            vec![cond.input_ids]
        };
        let embeds = self.encode_ids(&ids, options.clip_skip)?;
        Ok((embeds, pd, if guided { nd } else { 0 }))
    }

    /// Generates `options.batch` images.
    ///
    /// `init_latents` `[b, c, H/f, W/f]` are diffusers' `latents` argument (noise of unit
    /// variance, scaled here by `init_noise_sigma`); `None` draws them from the seeds.
    /// `progress` is called after every step.
    pub fn generate(
        &self,
        options: &TextToImageOptions,
        init_latents: Option<Tensor4<D>>,
        progress: &mut dyn FnMut(&StepProgress<'_, D>),
    ) -> Result<Generation<D>> {
        let (width, height) = self.check_options(options)?;
        let unet = &self.models.unet;
        let vae = &self.models.vae;
        let b = options.batch;
        let f = self.vae_factor();
        let latent_shape = (b, unet.config.in_channels, height / f, width / f);
        let sampler = options
            .sampler
            .build(&self.scheduler_config, options.steps)?;
        let guided = options.cfg_scale > 1.0;

        let (embeds, prompt_dropped, negative_dropped) = self.encode_text(options, guided)?;
        let dev = embeds.device().clone();
        // [rows, n, d] -> [rows · b, n, d]: uncond rows first, then cond rows (diffusers'
        // `torch.cat([negative_prompt_embeds, prompt_embeds])` after repeating per image).
        let rows = embeds.shape().0;
        let index: Vec<usize> = (0..rows).flat_map(|r| std::iter::repeat_n(r, b)).collect();
        let context: Tensor3<D> = embeds.gather(dev.tensor_from_vec(index, (rows * b,)));
        // the UNet's element type (f32, or f16 in mixed precision)
        let context = context.to_dtype::<E>();

        let mut noise = BatchNoise::seeded(options.seed, b);
        let init_given = init_latents.is_some();
        let latents = match init_latents {
            Some(l) => {
                if *l.shape() != latent_shape {
                    let (lb, lc, lh, lw) = *l.shape();
                    let (_, c, h, w) = latent_shape;
                    return Err(TextToImageError::InvalidOption {
                        option: "init_latents",
                        reason: format!(
                            "latents of shape [{lb}, {lc}, {lh}, {lw}], expected [{b}, {c}, {h}, \
                             {w}] for {b} image(s) of {width}x{height} (VAE factor {f})"
                        ),
                    });
                }
                l
            }
            None => {
                let mut v = vec![0f32; latent_shape.num_elements()];
                noise.fill_normal(&mut v);
                dev.tensor_from_vec(v, latent_shape)
            }
        };
        // [b, c, h, w]
        let mut x = latents * sampler.init_noise_sigma();
        let timesteps = sampler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let model_in = sampler.scale_model_input(x.clone(), i)?;
            let eps = if guided {
                // [2b, c, h, w]: the same latents for the uncond and the cond rows
                let doubled = (model_in.clone(), model_in).concat_along(Axis::<0>);
                let out = unet
                    .forward(doubled.to_dtype::<E>(), &[t], context.clone())?
                    .to_dtype::<f32>();
                let uncond = out.clone().slice((0..b, .., .., ..));
                let cond = out.slice((b..2 * b, .., .., ..));
                uncond.clone() + (cond - uncond) * options.cfg_scale
            } else {
                unet.forward(model_in.to_dtype::<E>(), &[t], context.clone())?
                    .to_dtype::<f32>()
            };
            x = sampler.step(&eps, i, &x, &mut noise)?.prev_sample;
            progress(&StepProgress {
                step: i,
                num_steps: timesteps.len(),
                timestep: t,
                latents: &x,
            });
        }

        // Decode one image at a time: the VAE decoder is the memory peak at full size.
        let scale = vae.config.scaling_factor as f32;
        let mut pixels = Vec::new();
        let mut image_shape = (b, 0, 0, 0);
        for i in 0..b {
            let z = x.clone().slice((i..i + 1, .., .., ..)) / scale;
            let decoded = vae.decode(z)?; // [1, 3, H, W]
            let (_, c, h, w) = *decoded.shape();
            image_shape = (b, c, h, w);
            let image = (decoded / 2.0 + 0.5).clamp(0.0, 1.0);
            pixels.extend(image.as_vec());
        }
        let images = dev.tensor_from_vec(pixels, image_shape);

        Ok(Generation {
            latents: x,
            images,
            settings: GenerationSettings {
                prompt: options.prompt.clone(),
                negative_prompt: options.negative_prompt.clone(),
                width,
                height,
                steps: options.steps,
                sampler: options.sampler,
                cfg_scale: options.cfg_scale,
                batch: b,
                seeds: (0..b as u64)
                    .map(|i| options.seed.wrapping_add(i))
                    .collect(),
                clip_skip: options.clip_skip,
                timesteps,
                init_latents_given: init_given,
                prompt_tokens_dropped: prompt_dropped,
                negative_tokens_dropped: negative_dropped,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_noise_is_per_image() {
        let mut batch = BatchNoise::seeded(7, 3);
        let mut v = vec![0f32; 12];
        batch.fill_normal(&mut v);
        for i in 0..3 {
            let mut alone = vec![0f32; 4];
            SeededNoise::new(7 + i as u64).fill_normal(&mut alone);
            assert_eq!(&v[i * 4..(i + 1) * 4], &alone[..]);
        }
        // the next draw continues each image's own stream
        let mut w = vec![0f32; 6];
        batch.fill_normal(&mut w);
        let mut second = SeededNoise::new(8);
        let mut skip = vec![0f32; 4];
        second.fill_normal(&mut skip);
        let mut next = vec![0f32; 2];
        second.fill_normal(&mut next);
        assert_eq!(&w[2..4], &next[..]);
    }

    #[test]
    fn gcd_and_multiples() {
        assert_eq!(gcd(8, 64), 8);
        assert_eq!(gcd(8, 4), 4);
        assert_eq!(8 / gcd(8, 4) * 4, 8);
        assert_eq!(8 / gcd(8, 64) * 64, 64);
        assert_eq!(8 / gcd(8, 12) * 12, 24);
    }
}
