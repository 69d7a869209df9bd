//! Drawing the micro-batches of a run: every draw is seeded by the pipeline seed, the step and
//! the micro-batch, so a rerun is bit-identical on the CPU and a run resumed from a checkpoint
//! ends exactly where an uninterrupted one does.

use dfdx::prelude::*;
use rand::{RngExt, SeedableRng};

use crate::diffusion::nn::Tensor4;
use crate::diffusion::schedulers::SeededNoise;
use crate::train::captions::CaptionShaping;
use crate::train::noise::NoiseShaping;
use crate::train::timesteps::TimestepSampling;

/// One latent item in memory: the VAE posterior's mean and std and the item's caption.
#[derive(Debug, Clone)]
pub struct Item {
    /// The caption its text-encoder states come from.
    pub caption: String,
    /// Posterior mean, `[c, h, w]` row-major (unscaled).
    pub mean: Vec<f32>,
    /// Posterior standard deviation, same layout.
    pub std: Vec<f32>,
    /// `[c, h, w]`.
    pub shape: [usize; 3],
}

/// One micro-batch: latent samples, noise, timesteps, and which items they are.
pub struct Batch<D: Device<f32>> {
    /// Scaled latent samples, `[b, c, h, w]`.
    pub latents: Tensor4<D>,
    /// The noise added, same shape.
    pub noise: Tensor4<D>,
    /// One training timestep per item.
    pub timesteps: Vec<usize>,
    /// Indices of the items drawn.
    pub picked: Vec<usize>,
    /// The caption each drawn item trains with this time (its own, unless `captions`
    /// shaping changed it).
    pub captions: Vec<String>,
    /// The optimiser step it was drawn for.
    pub step: u64,
    /// The micro-batch within the step.
    pub micro: u64,
}

/// How micro-batches are drawn: size, the timestep range, noise and captions.
#[derive(Debug, Clone)]
pub struct Sampling {
    /// Items per micro-batch (drawn from one latent size).
    pub batch_size: usize,
    /// Smallest timestep drawn.
    pub min_timestep: usize,
    /// One past the largest timestep drawn.
    pub max_timestep: usize,
    /// How the drawn Gaussian noise is shaped (noise offset, pyramid noise).
    pub noise: NoiseShaping,
    /// How timesteps are drawn in `min_timestep..max_timestep`.
    pub timesteps: TimestepSampling,
    /// How captions change each time an item is drawn.
    pub captions: CaptionShaping,
}

impl Sampling {
    /// The micro-batch of `step`: items of one latent size, latent samples
    /// `(mean + std·ε)·scaling`, noise (shaped by `noise`), timesteps (drawn by `timesteps`),
    /// captions (shaped by `captions`, from a generator of their own so that shaping them
    /// changes no other draw).
    #[allow(clippy::too_many_arguments)]
    pub fn draw<D: Device<f32>>(
        &self,
        items: &[Item],
        scaling: f32,
        seed: u64,
        step: u64,
        micro: u64,
        dev: &D,
    ) -> Batch<D> {
        let batch_seed = mix(seed, step, micro);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(batch_seed);
        let picked = self.pick(items, &mut rng);
        let [c, h, w] = items[picked[0]].shape;
        let mut noise_src = SeededNoise::new(batch_seed ^ 0x05ee_d0f0_015e);
        let mut latents = Vec::with_capacity(picked.len() * c * h * w);
        for &i in &picked {
            for (m, s) in items[i].mean.iter().zip(&items[i].std) {
                latents.push((m + s * noise_src.next_normal() as f32) * scaling);
            }
        }
        let mut noise: Vec<f32> = (0..latents.len())
            .map(|_| noise_src.next_normal() as f32)
            .collect();
        let b = picked.len();
        self.noise.apply(
            &mut noise,
            &latents,
            [b, c, h, w],
            batch_seed ^ 0x0ff5_e7ed_0015_e5a7,
        );
        let timesteps: Vec<usize> = picked
            .iter()
            .map(|_| {
                self.timesteps
                    .draw(&mut rng, self.min_timestep, self.max_timestep)
            })
            .collect();
        let captions = self.shape_captions(items, &picked, batch_seed);
        Batch {
            latents: dev.tensor_from_vec(latents, (b, c, h, w)),
            noise: dev.tensor_from_vec(noise, (b, c, h, w)),
            timesteps,
            picked,
            captions,
            step,
            micro,
        }
    }
}

impl Sampling {
    /// The items of a micro-batch: a first one, then the rest from items of its latent size.
    fn pick(&self, items: &[Item], rng: &mut rand_chacha::ChaCha8Rng) -> Vec<usize> {
        let first = rng.random_range(0..items.len());
        let same: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].shape == items[first].shape)
            .collect();
        let mut picked = vec![first];
        while picked.len() < self.batch_size {
            picked.push(same[rng.random_range(0..same.len())]);
        }
        picked
    }

    /// The captions the `picked` items train with in the micro-batch of `batch_seed`.
    fn shape_captions(&self, items: &[Item], picked: &[usize], batch_seed: u64) -> Vec<String> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(batch_seed ^ 0xCA97_1075_5EED_0001);
        picked
            .iter()
            .map(|&i| self.captions.apply(&items[i].caption, &mut rng))
            .collect()
    }

    /// The items and captions of the micro-batch of `step` (what [`Self::draw`] picks, without
    /// drawing latents or noise): for the record of what a run trained on.
    pub fn captions_at(
        &self,
        items: &[Item],
        seed: u64,
        step: u64,
        micro: u64,
    ) -> Vec<(usize, String)> {
        let batch_seed = mix(seed, step, micro);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(batch_seed);
        let picked = self.pick(items, &mut rng);
        let captions = self.shape_captions(items, &picked, batch_seed);
        picked.into_iter().zip(captions).collect()
    }
}

/// A seed derived from the run's seed, the step and the micro-batch (or any two counters).
pub fn mix(seed: u64, step: u64, micro: u64) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(&step.to_le_bytes());
    h.update(&micro.to_le_bytes());
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap_or_default())
}
