//! Running a benchmark task on a device: the model (random SD 1.5-shaped weights, the tiny
//! fixture or a checkpoint), random data of the asked shape, and the stages' own step or forward
//! timed over the iterations.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use dfdx::prelude::*;
use rand::{RngExt, SeedableRng};

use super::{BenchArch, BenchError, BenchOptions, BenchReport, BenchTask, StepTimes};
use crate::diffusion::checkpoint::single_file::StoredConfigs;
use crate::diffusion::clip::ClipConfig;
use crate::diffusion::nn::weights::{Loader, WeightStore};
use crate::diffusion::nn::{DEFAULT_ATTENTION_CHUNK, Elem};
use crate::diffusion::nn::{Tensor2, Tensor3, Tensor4};
use crate::diffusion::params::{count_params, set_trainable};
use crate::diffusion::schedulers::{Ddpm, SamplerKind, SchedulerConfig, SeededNoise};
use crate::diffusion::{Checkpoint, DiffusionError, TextEncoder, UNet, UNetConfig, Vae, VaeConfig};
use crate::engine::Progress;
use crate::formats::HostTensor;
use crate::formats::embedding::Embedding;
use crate::formats::lora::{LoraModule, LoraNetwork};
use crate::memory::{LoadedModels, MemoryProbe, TrainShape, TrainedPart, estimate_train};
use crate::train::batch::{Batch, Item, Sampling};
use crate::train::lora::install;
use crate::train::methods::{DreamboothSteps, LoraSteps, TiSteps};
use crate::train::mixed::{Masters, StepScaler};
use crate::train::optim::{AdamW, AdamWConfig, Optimizer};
use crate::train::run_loop::step as train_step;
use crate::train::text::TextInputs;

/// Where the weights of a benchmark come from.
enum Weights {
    Synthetic(WeightStore),
    Checkpoint(Box<Checkpoint>),
}

/// The tiny test model: `tests/fixtures/tiny-sd` under the current folder, else under the
/// source tree this binary was built from.
fn tiny_path() -> Result<PathBuf, BenchError> {
    let rel = Path::new("tests/fixtures/tiny-sd");
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    [rel.to_path_buf(), built]
        .into_iter()
        .find(|p| p.join("model_index.json").is_file())
        .ok_or_else(|| {
            BenchError::Usage(
                "--arch tiny: tests/fixtures/tiny-sd is not under the current folder nor in the \
                 source tree of this binary; give its path instead"
                    .into(),
            )
        })
}

/// The configs and weights of `arch`.
fn open_arch(arch: &BenchArch, seed: u64) -> Result<(StoredConfigs, Weights), BenchError> {
    let path = match arch {
        BenchArch::Sd15 => {
            return Ok((
                StoredConfigs {
                    unet: UNetConfig::default(),
                    vae: VaeConfig::default(),
                    text_encoder: ClipConfig::default(),
                },
                Weights::Synthetic(WeightStore::synthetic(seed)),
            ));
        }
        BenchArch::Tiny => tiny_path()?,
        BenchArch::Path(p) => p.clone(),
    };
    let ckpt = Checkpoint::open(&path).map_err(|source| BenchError::Model {
        context: format!("opening {}", path.display()),
        source,
    })?;
    Ok((ckpt.configs(), Weights::Checkpoint(Box::new(ckpt))))
}

fn model_err(what: &str) -> impl FnOnce(DiffusionError) -> BenchError + '_ {
    move |source| BenchError::Model {
        context: format!("building the {what}"),
        source,
    }
}

impl Weights {
    fn unet<E: Elem, D: Device<E>>(
        &self,
        c: &StoredConfigs,
        dev: &D,
        gradient_checkpointing: bool,
    ) -> Result<UNet<D, E>, BenchError> {
        let mut unet = self.unet_plain(c, dev)?;
        unet.set_gradient_checkpointing(gradient_checkpointing);
        Ok(unet)
    }

    fn unet_plain<E: Elem, D: Device<E>>(
        &self,
        c: &StoredConfigs,
        dev: &D,
    ) -> Result<UNet<D, E>, BenchError> {
        match self {
            Self::Synthetic(s) => UNet::load(&Loader::new(s, dev), &c.unet),
            Self::Checkpoint(ck) => ck.load_unet_as(dev),
        }
        .map_err(model_err("UNet"))
    }
    fn text_encoder<D: Device<f32>>(
        &self,
        c: &StoredConfigs,
        dev: &D,
    ) -> Result<TextEncoder<D>, BenchError> {
        match self {
            Self::Synthetic(s) => TextEncoder::load(&Loader::new(s, dev), &c.text_encoder),
            Self::Checkpoint(ck) => ck.load_text_encoder(dev),
        }
        .map_err(model_err("text encoder"))
    }
    fn vae<D: Device<f32>>(&self, c: &StoredConfigs, dev: &D) -> Result<Vae<D>, BenchError> {
        match self {
            Self::Synthetic(s) => Vae::load(&Loader::new(s, dev), &c.vae),
            Self::Checkpoint(ck) => ck.load_vae(dev),
        }
        .map_err(model_err("VAE"))
    }
}

/// What width and height must be multiples of for `configs`: 8 and the VAE factor times the
/// UNet's `2^(levels − 1)` (64 for SD 1.5), as the txt2img pipeline requires.
pub fn size_multiple(configs: &StoredConfigs) -> usize {
    let f = configs.vae.downsampling_factor();
    let total = f << configs.unet.block_out_channels.len().saturating_sub(1);
    let g = gcd(8, total);
    8 / g * total
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Normal values from `seed`.
fn normal(seed: u64, n: usize) -> Vec<f32> {
    let mut src = SeededNoise::new(seed);
    (0..n).map(|_| src.next_normal() as f32).collect()
}

/// Runs the benchmark on `dev` (named `device`: `cpu`, `cuda:0`), with a progress bar over
/// the steps. Each timed step ends with a device synchronisation, so asynchronous devices
/// are timed to the end of their work.
pub fn run_on<E: Elem, D: Device<f32> + Device<E> + dfdx::tensor::Synchronize>(
    dev: &D,
    device: &str,
    opts: &BenchOptions,
    progress: &Progress,
) -> Result<BenchReport, BenchError> {
    let task = opts.task;
    let (configs, weights) = open_arch(&opts.arch, opts.seed)?;
    let m = size_multiple(&configs);
    if !opts.resolution.is_multiple_of(m) {
        return Err(BenchError::Usage(format!(
            "--resolution {}: it must be a multiple of {m} for this model (8 and its total \
             downsampling: VAE factor {} × 2^(UNet levels − 1)); e.g. {}",
            opts.resolution,
            configs.vae.downsampling_factor(),
            (opts.resolution / m).max(1) * m
        )));
    }
    let latent = opts.resolution / configs.vae.downsampling_factor();
    let b = opts.batch;
    let step_err = |e: &dyn std::fmt::Display| BenchError::Step {
        task,
        reason: e.to_string(),
    };

    // The probe starts before the models are built: their weights count, as in
    // ref_bench.py's max_memory_allocated.
    let probe = MemoryProbe::start(device);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
    let lc = configs.unet.in_channels;
    let ctx_dim = configs.unet.cross_attention_dim;
    let tokens = configs.text_encoder.max_position_embeddings;
    let latents: Tensor4<D> = dev.tensor_from_vec(
        normal(opts.seed ^ 1, b * lc * latent * latent),
        (b, lc, latent, latent),
    );
    let noise: Tensor4<D> = dev.tensor_from_vec(
        normal(opts.seed ^ 2, b * lc * latent * latent),
        (b, lc, latent, latent),
    );
    let context: Tensor3<D> = dev.tensor_from_vec(
        normal(opts.seed ^ 3, b * tokens * ctx_dim),
        (b, tokens, ctx_dim),
    );
    let timesteps: Vec<usize> = (0..b).map(|_| rng.random_range(0..1000)).collect();
    let ddpm = Ddpm::new(&SchedulerConfig::sd15()).map_err(|e| step_err(&e))?;

    let model_params;
    let mut trainable_params = 0;
    let mut last_loss = None;
    let bar = progress.bar(
        (opts.warmup + opts.iters) as u64,
        &format!(
            "bench {task} {} b{b} {}px",
            opts.arch.name(),
            opts.resolution
        ),
    );
    let mut times = Vec::with_capacity(opts.iters);
    let mut timed = |step: &mut dyn FnMut() -> Result<Option<f32>, BenchError>|
     -> Result<Option<f32>, BenchError> {
        let mut loss = None;
        for i in 0..opts.warmup + opts.iters {
            let t0 = Instant::now();
            loss = step()?;
            dev.try_synchronize().map_err(|e| step_err(&format!("{e:?}")))?;
            if i >= opts.warmup {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            bar.inc(1);
        }
        Ok(loss)
    };

    match task {
        BenchTask::LoraTrain => {
            let mut unet: UNet<D, E> = weights.unet(&configs, dev, opts.gradient_checkpointing)?;
            model_params = count_params(&mut unet);
            let mut network = LoraNetwork::default();
            let rank = opts.rank;
            let mut init_err = None;
            unet.for_each_attention_linear_mut(|name, linear| {
                let (o, i) = *linear.weight.shape();
                match LoraModule::init(&[o, i], rank, rank as f32, opts.seed) {
                    Ok(module) => {
                        network.unet.insert(name.to_string(), module.into());
                    }
                    Err(e) => init_err = Some(e),
                }
            });
            if let Some(e) = init_err {
                return Err(step_err(&e));
            }
            trainable_params = network.unet.values().map(|m| m.num_params()).sum();
            install(&mut unet, &network, 1.0, dev).map_err(|e| step_err(&e))?;
            // the train stage's step: f32 masters, loss scaling in f16
            let masters = Masters::of_lora(&network, dev).map_err(|e| step_err(&e))?;
            let mut optimizer = Optimizer::AdamW(AdamW::new(dev, AdamWConfig::default()));
            let (items, contexts) = caption_contexts(&context, b);
            let (ids, scratch) = (HashMap::new(), std::env::temp_dir());
            let mut steps = LoraSteps {
                unet: &mut unet,
                text_encoder: None,
                ddpm: &ddpm,
                text: TextInputs {
                    contexts: &contexts,
                    ids: &ids,
                    clip_skip: 0,
                    tokenizer: None,
                    frozen_encoder: None,
                },
                optimizer: &mut optimizer,
                scratch: &scratch,
                dropout: 0.0,
                seed: opts.seed,
                te_lr_factor: 1.0,
                masters,
                te_keys: HashSet::new(),
                scaler: StepScaler::new::<E>(None),
                metadata: Default::default(),
                modules: network,
                base_weights: Default::default(),
                dev: dev.clone(),
            };
            let captions: Vec<String> = items.iter().map(|i| i.caption.clone()).collect();
            let draw = |_| whole_batch(&latents, &noise, &timesteps, &captions);
            last_loss = timed(&mut || {
                let outcome =
                    train_step(&mut steps, draw, 1e-4, 1, 1.0).map_err(|e| step_err(&e))?;
                Ok(Some(outcome.loss))
            })?;
        }
        BenchTask::FullTrain => {
            let mut unet: UNet<D, E> = weights.unet(&configs, dev, opts.gradient_checkpointing)?;
            model_params = count_params(&mut unet);
            trainable_params = model_params;
            set_trainable(&mut unet, true);
            // the DreamBooth stage's step: in f16, f32 masters refreshed into the f16 model
            let mut master: Option<UNet<D>> = if E::HALF {
                Some(weights.unet(&configs, dev, false)?)
            } else {
                None
            };
            let mut optimizer = Optimizer::AdamW(AdamW::new(dev, AdamWConfig::default()));
            let (items, contexts) = caption_contexts(&context, b);
            let (ids, scratch) = (HashMap::new(), std::env::temp_dir());
            let mut steps = DreamboothSteps {
                sampling: Sampling {
                    batch_size: b,
                    min_timestep: 0,
                    max_timestep: 1000,
                    noise: Default::default(),
                    timesteps: Default::default(),
                    captions: Default::default(),
                },
                unet: &mut unet,
                text_encoder: None,
                ddpm: &ddpm,
                items: &items,
                class_items: &[],
                text: TextInputs {
                    contexts: &contexts,
                    ids: &ids,
                    clip_skip: 0,
                    tokenizer: None,
                    frozen_encoder: None,
                },
                optimizer: &mut optimizer,
                scratch: &scratch,
                scaling: 1.0,
                prior_weight: 0.0,
                seed: opts.seed,
                te_lr_factor: 1.0,
                master: master.as_mut(),
                scaler: StepScaler::new::<E>(None),
                write_model: &|_, _, _, _| {
                    anyhow::bail!("the benchmark times steps and saves no checkpoint")
                },
            };
            let captions: Vec<String> = items.iter().map(|i| i.caption.clone()).collect();
            let draw = |_| whole_batch(&latents, &noise, &timesteps, &captions);
            last_loss = timed(&mut || {
                let outcome =
                    train_step(&mut steps, draw, 1e-6, 1, 1.0).map_err(|e| step_err(&e))?;
                Ok(Some(outcome.loss))
            })?;
        }
        BenchTask::TiTrain => {
            let mut te = weights.text_encoder(&configs, dev)?;
            let mut unet: UNet<D, E> = weights.unet(&configs, dev, opts.gradient_checkpointing)?;
            model_params = count_params(&mut te) + count_params(&mut unet);
            let d = configs.text_encoder.hidden_size;
            let vocab = configs.text_encoder.vocab_size;
            trainable_params = d;
            let mut extra = dev.tensor_from_vec(normal(opts.seed ^ 4, d), (1, d));
            // Random token ids with the new token (id `vocab`, the first past the table) at
            // position 1 of every caption.
            let ids: Vec<Vec<u32>> = (0..b)
                .map(|_| {
                    (0..tokens)
                        .map(|p| {
                            if p == 1 {
                                vocab as u32
                            } else {
                                rng.random_range(0..vocab as u32)
                            }
                        })
                        .collect()
                })
                .collect();
            // the textual-inversion stage's step
            let items: Vec<Item> = (0..b)
                .map(|i| Item {
                    caption: format!("bench item {i}"),
                    mean: Vec::new(),
                    std: Vec::new(),
                    shape: [0; 3],
                })
                .collect();
            let ids: HashMap<String, Vec<u32>> =
                (items.iter().map(|i| i.caption.clone())).zip(ids).collect();
            let mut optimizer = Optimizer::AdamW(AdamW::new(dev, AdamWConfig::default()));
            let scratch = std::env::temp_dir();
            let embedding = |vectors: &Tensor2<D>, step: u64| Embedding {
                token: "bench".into(),
                vectors: HostTensor::from_tensor(vectors),
                step: Some(step),
                sd_checkpoint: None,
                sd_checkpoint_name: None,
            };
            let mut steps = TiSteps {
                clip_skip: 0,
                text_encoder: &te,
                unet: &unet,
                ddpm: &ddpm,
                text: TextInputs {
                    contexts: &HashMap::new(),
                    ids: &ids,
                    clip_skip: 0,
                    tokenizer: None,
                    frozen_encoder: None,
                },
                extra: &mut extra,
                optimizer: &mut optimizer,
                scratch: &scratch,
                embedding: &embedding,
                scaler: StepScaler::new::<E>(None),
            };
            let captions: Vec<String> = items.iter().map(|i| i.caption.clone()).collect();
            let draw = |_| whole_batch(&latents, &noise, &timesteps, &captions);
            last_loss = timed(&mut || {
                let outcome =
                    train_step(&mut steps, draw, 5e-4, 1, 1.0).map_err(|e| step_err(&e))?;
                Ok(Some(outcome.loss))
            })?;
        }
        BenchTask::UnetForward => {
            let mut unet: UNet<D, E> = weights.unet(&configs, dev, opts.gradient_checkpointing)?;
            model_params = count_params(&mut unet);
            let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
            let (latents, context) = (latents.to_dtype::<E>(), context.to_dtype::<E>());
            timed(&mut || {
                let out = unet
                    .forward(latents.clone(), &t, context.clone())
                    .map_err(|e| step_err(&e))?;
                std::hint::black_box(out);
                Ok(None)
            })?;
        }
        BenchTask::SampleStep => {
            let mut unet: UNet<D, E> = weights.unet(&configs, dev, opts.gradient_checkpointing)?;
            model_params = count_params(&mut unet);
            // The text states of the batch doubled: uncond rows, then cond rows.
            let doubled_ctx: Tensor3<D> = dev.tensor_from_vec(
                normal(opts.seed ^ 5, 2 * b * tokens * ctx_dim),
                (2 * b, tokens, ctx_dim),
            );
            let doubled_ctx = doubled_ctx.to_dtype::<E>();
            let sampler = SamplerKind::Euler
                .build(&SchedulerConfig::sd15(), 30)
                .map_err(|e| step_err(&e))?;
            let i = sampler.num_steps() / 2;
            let t = sampler.timesteps()[i];
            let cfg_scale = 7.5f32;
            let x = latents.clone() * sampler.init_noise_sigma();
            let mut src = SeededNoise::new(opts.seed ^ 6);
            timed(&mut || {
                let model_in = sampler
                    .scale_model_input(x.clone(), i)
                    .map_err(|e| step_err(&e))?;
                let doubled = (model_in.clone(), model_in).concat_along(Axis::<0>);
                // the UNet in its element type, the sampler in f32 (as the pipeline does)
                let out = unet
                    .forward(doubled.to_dtype::<E>(), &[t], doubled_ctx.clone())
                    .map_err(|e| step_err(&e))?
                    .to_dtype::<f32>();
                let uncond = out.clone().slice((0..b, .., .., ..));
                let cond = out.slice((b..2 * b, .., .., ..));
                let eps = uncond.clone() + (cond - uncond) * cfg_scale;
                // Every step starts from the same latents, so the figures do not drift.
                let next = sampler
                    .step(&eps, i, &x, &mut src)
                    .map_err(|e| step_err(&e))?
                    .prev_sample;
                std::hint::black_box(next);
                Ok(None)
            })?;
        }
        BenchTask::VaeEncode => {
            let mut vae = weights.vae(&configs, dev)?;
            model_params = count_params(&mut vae);
            let c = configs.vae.in_channels;
            let r = opts.resolution;
            let images: Tensor4<D> =
                dev.tensor_from_vec(normal(opts.seed ^ 7, b * c * r * r), (b, c, r, r));
            timed(&mut || {
                let dist = vae.encode(images.clone()).map_err(|e| step_err(&e))?;
                std::hint::black_box(dist.mean);
                Ok(None)
            })?;
        }
    }
    bar.finish_and_clear();

    let step_ms = StepTimes::of(&times);
    let per_step = match task {
        BenchTask::SampleStep => 1.0,
        _ => b as f64,
    };
    let peak = probe.peak();
    let memory_source = peak.as_ref().map_or_else(
        || format!("{device}: no memory probe in this binary"),
        |p| p.source.clone(),
    );
    let peak_memory_bytes = peak.map(|p| p.bytes);
    let part = match task {
        BenchTask::LoraTrain => Some(TrainedPart::Lora {
            rank: opts.rank,
            targets: ["to_q", "to_k", "to_v", "to_out.0"]
                .map(String::from)
                .to_vec(),
            text_encoder: None,
            method: crate::train::Method::Lora,
        }),
        BenchTask::FullTrain => Some(TrainedPart::FullUnet {
            text_encoder: false,
        }),
        BenchTask::TiTrain => Some(TrainedPart::TextualInversion { vectors: 1 }),
        _ => None,
    };
    let memory_estimate_bytes = part.map(|part| {
        let shape = TrainShape {
            batch: b,
            height: opts.resolution,
            width: opts.resolution,
            attention_chunk: DEFAULT_ATTENTION_CHUNK,
            gradient_checkpointing: opts.gradient_checkpointing,
            device: device.to_string(),
            loaded: LoadedModels {
                text_encoder: task == BenchTask::TiTrain,
                vae: false,
            },
            unet_elem_bytes: E::BYTES as u64,
            optimizer: crate::train::optim::OptimizerKind::AdamW,
            ema: false,
        };
        estimate_train(&configs, &part, &shape).map(|e| e.total)
    });
    let memory_estimate_bytes =
        (memory_estimate_bytes.transpose()).map_err(|reason| BenchError::Step { task, reason })?;
    Ok(BenchReport {
        task,
        arch: opts.arch.name(),
        batch: b,
        resolution: opts.resolution,
        latent_size: latent,
        gradient_checkpointing: opts.gradient_checkpointing,
        iters: opts.iters,
        warmup: opts.warmup,
        device: device.to_string(),
        precision: E::NAME.into(),
        sdpipe_version: env!("CARGO_PKG_VERSION").into(),
        key: task.key(b, opts.resolution),
        value: per_step / (step_ms.median / 1e3).max(1e-12),
        unit: task.unit().into(),
        note: format!("step {:.1} ms", step_ms.median),
        step_ms,
        peakmem_gib: peak_memory_bytes.map(|b| b as f64 / (1u64 << 30) as f64),
        peak_memory_bytes,
        memory_source,
        model_params,
        trainable_params,
        rank: (task == BenchTask::LoraTrain).then_some(opts.rank),
        memory_estimate_bytes,
        last_loss,
    })
}

/// `b` items with their own captions, and each caption's row of `context` (the stages look
/// contexts up by caption).
fn caption_contexts<D: Device<f32>>(
    context: &Tensor3<D>,
    b: usize,
) -> (Vec<Item>, HashMap<String, Tensor3<D>>) {
    let (_, n, d) = *context.shape();
    let rows = context.as_vec();
    let mut items = Vec::with_capacity(b);
    let mut contexts = HashMap::with_capacity(b);
    for (i, row) in rows.chunks(n * d).take(b).enumerate() {
        let caption = format!("bench item {i}");
        contexts.insert(
            caption.clone(),
            context.device().tensor_from_vec(row.to_vec(), (1, n, d)),
        );
        items.push(Item {
            caption,
            mean: Vec::new(),
            std: Vec::new(),
            shape: [0; 3],
        });
    }
    (items, contexts)
}

/// The benchmark's one batch, as the stages' loop hands it to a method: every item (captioned
/// `captions`), fixed latents, noise and timesteps.
fn whole_batch<D: Device<f32>>(
    latents: &Tensor4<D>,
    noise: &Tensor4<D>,
    timesteps: &[usize],
    captions: &[String],
) -> Batch<D> {
    Batch {
        latents: latents.clone(),
        noise: noise.clone(),
        timesteps: timesteps.to_vec(),
        picked: (0..timesteps.len()).collect(),
        captions: captions.to_vec(),
        step: 0,
        micro: 0,
    }
}
