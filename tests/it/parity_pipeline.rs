//! Text-to-image pipeline against diffusers' `StableDiffusionPipeline` (the 4-step DDIM golden,
//! `goldens/pipeline_ddim4.safetensors`, tolerance 1e-3 from the fixtures' README), and the
//! seeded samplers' determinism.

use std::path::{Path, PathBuf};

use dfdx::prelude::*;
use safetensors::SafeTensors;
use sdpipe::diffusion::checkpoint::{Checkpoint, CheckpointLayout};
use sdpipe::diffusion::schedulers::SamplerKind;
use sdpipe::diffusion::text_to_image::{
    Generation, TextToImage, TextToImageError, TextToImageOptions,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Reads an F32 or I64 golden tensor as f32 values and its shape.
fn golden(name: &str) -> (Vec<f32>, Vec<usize>) {
    let path = fixtures().join("goldens/pipeline_ddim4.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let v = match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        other => panic!("golden {name} has dtype {other:?}"),
    };
    (v, t.shape().to_vec())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).fold(0f32, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() { f32::INFINITY } else { m.max(d) }
    })
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let err = max_abs_diff(got, want);
    println!("{what}: max abs error {err:.3e} (tolerance {tol:.0e})");
    assert!(err <= tol, "{what}: max abs error {err} > {tol}");
}

fn diffusers_pipeline() -> TextToImage<Cpu> {
    let ckpt = Checkpoint::open(fixtures().join("tiny-sd")).unwrap();
    assert_eq!(ckpt.layout, CheckpointLayout::Diffusers);
    TextToImage::load(&ckpt, None, &Cpu::default()).unwrap()
}

/// The single file, with the configs (and tokenizer, scheduler config) of the folder.
fn single_file_pipeline() -> TextToImage<Cpu> {
    let dir = fixtures().join("tiny-sd");
    let ckpt = Checkpoint::open(fixtures().join("tiny-sd-single-file.safetensors"))
        .unwrap()
        .with_configs_from(&dir)
        .unwrap();
    assert_eq!(ckpt.layout, CheckpointLayout::SingleFile);
    TextToImage::load(&ckpt, Some(&dir), &Cpu::default()).unwrap()
}

fn golden_options() -> TextToImageOptions {
    TextToImageOptions {
        prompt: "a photo of sks dog".into(),
        negative_prompt: String::new(),
        width: Some(16),
        height: Some(16),
        steps: 4,
        sampler: SamplerKind::Ddim,
        cfg_scale: 7.5,
        batch: 1,
        seed: 0,
        clip_skip: 0,
    }
}

/// The golden's run: returns the generation and the latents after every step.
fn run_golden(pipe: &TextToImage<Cpu>) -> (Generation<Cpu>, Vec<Vec<f32>>, Vec<f32>) {
    let (init, shape) = golden("initial_latents");
    let init = Cpu::default().tensor_from_vec(init, (shape[0], shape[1], shape[2], shape[3]));
    let mut per_step = Vec::new();
    let mut timesteps = Vec::new();
    let generation = pipe
        .generate(&golden_options(), Some(init), &mut |p| {
            assert_eq!(p.num_steps, 4);
            assert_eq!(p.step, per_step.len());
            per_step.push(p.latents.as_vec());
            timesteps.push(p.timestep);
        })
        .unwrap();
    (generation, per_step, timesteps)
}

fn check_golden(pipe: &TextToImage<Cpu>, what: &str) {
    let (generation, per_step, timesteps) = run_golden(pipe);
    assert_eq!(timesteps, golden("timesteps").0, "{what}: timesteps");
    assert_eq!(generation.settings.timesteps, timesteps);
    let (want_steps, _) = golden("latents_per_step");
    let n = per_step[0].len();
    let worst = per_step
        .iter()
        .enumerate()
        .map(|(i, got)| max_abs_diff(got, &want_steps[i * n..(i + 1) * n]))
        .fold(0f32, f32::max);
    println!("pipeline latents_per_step ({what}): max abs error {worst:.3e} (tolerance 1e-3)");
    assert!(worst <= 1e-3, "{what}: latents_per_step error {worst}");
    assert_close(
        &format!("pipeline final_latents ({what})"),
        &generation.latents.as_vec(),
        &golden("final_latents").0,
        1e-3,
    );
    let (image, shape) = golden("image");
    let (b, c, h, w) = *generation.images.shape();
    assert_eq!(vec![b, c, h, w], shape, "{what}: image shape");
    assert_close(
        &format!("pipeline image ({what})"),
        &generation.images.as_vec(),
        &image,
        1e-3,
    );
    let s = &generation.settings;
    assert_eq!((s.width, s.height, s.steps, s.batch), (16, 16, 4, 1));
    assert!(s.init_latents_given);
    assert_eq!(generation.image_chw(0).unwrap(), generation.images.as_vec());
    assert!(generation.image_chw(1).is_none());
}

#[test]
fn ddim4_matches_diffusers_from_the_folder() {
    check_golden(&diffusers_pipeline(), "diffusers folder");
}

#[test]
fn ddim4_matches_diffusers_from_the_single_file() {
    check_golden(&single_file_pipeline(), "single file");
}

/// Final latents and images of a seeded run (per image: latents then pixels).
fn seeded(pipe: &TextToImage<Cpu>, sampler: SamplerKind, seed: u64, batch: usize) -> Vec<f32> {
    let options = TextToImageOptions {
        prompt: "a photo of sks dog".into(),
        negative_prompt: "blurry".into(),
        steps: 5,
        sampler,
        seed,
        batch,
        ..TextToImageOptions::default()
    };
    let g = pipe.generate(&options, None, &mut |_| {}).unwrap();
    assert_eq!(
        g.settings.seeds,
        (seed..seed + batch as u64).collect::<Vec<_>>()
    );
    // the native size: sample_size 8 x VAE factor 2
    assert_eq!(*g.images.shape(), (batch, 3, 16, 16));
    assert!(!g.settings.init_latents_given);
    let (latents, images) = (g.latents.as_vec(), g.images.as_vec());
    let (nl, ni) = (latents.len() / batch, images.len() / batch);
    (0..batch)
        .flat_map(|i| {
            latents[i * nl..(i + 1) * nl]
                .iter()
                .chain(&images[i * ni..(i + 1) * ni])
                .copied()
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn seeded_samplers_are_deterministic_and_depend_on_the_seed() {
    let pipe = diffusers_pipeline();
    for sampler in [SamplerKind::Euler, SamplerKind::EulerAncestral] {
        let a = seeded(&pipe, sampler, 3, 1);
        let b = seeded(&pipe, sampler, 3, 1);
        assert_eq!(a, b, "{sampler}: two runs with seed 3 differ");
        let c = seeded(&pipe, sampler, 4, 1);
        let diff = max_abs_diff(&a, &c);
        println!("{sampler}: seed 3 vs 4 max abs difference {diff:.3e}");
        assert!(diff > 1e-3, "{sampler}: seeds 3 and 4 give the same image");
        // image 1 of a batch from seed 3 is the image seed 4 gives alone
        let batch = seeded(&pipe, sampler, 3, 2);
        let half = batch.len() / 2;
        assert_close(
            &format!("{sampler}: batch image 0 vs seed 3 alone"),
            &batch[..half],
            &a,
            1e-4,
        );
        assert_close(
            &format!("{sampler}: batch image 1 vs seed 4 alone"),
            &batch[half..],
            &c,
            1e-4,
        );
    }
}

#[test]
fn guidance_off_runs_the_conditional_batch_only() {
    let pipe = diffusers_pipeline();
    let (init, shape) = golden("initial_latents");
    let init = Cpu::default().tensor_from_vec(init, (shape[0], shape[1], shape[2], shape[3]));
    let options = TextToImageOptions {
        cfg_scale: 1.0,
        ..golden_options()
    };
    let g = pipe
        .generate(&options, Some(init.clone()), &mut |_| {})
        .unwrap();
    // one DDIM step by hand from the conditional noise prediction only
    let ids = vec![
        pipe.tokenizer
            .encode("a photo of sks dog")
            .unwrap()
            .input_ids,
    ];
    let ctx = pipe.models.text_encoder().encode(&ids, 0).unwrap();
    let sampler = SamplerKind::Ddim.build(&pipe.scheduler_config, 4).unwrap();
    let mut x = init;
    let mut noise = sdpipe::diffusion::schedulers::SeededNoise::new(0);
    for (i, &t) in sampler.timesteps().iter().enumerate() {
        let eps = pipe
            .models
            .unet
            .forward(x.clone(), &[t], ctx.clone())
            .unwrap();
        x = sampler.step(&eps, i, &x, &mut noise).unwrap().prev_sample;
    }
    assert_close(
        "cfg 1: latents vs conditional-only loop",
        &g.latents.as_vec(),
        &x.as_vec(),
        1e-5,
    );
}

#[test]
fn bad_options_are_named() {
    let pipe = diffusers_pipeline();
    // the tiny model's total downsampling is 4 (VAE 2 x UNet 2): multiples of 8 are needed
    assert_eq!(pipe.size_multiple(), 8);
    assert_eq!(pipe.default_size(), (16, 16));
    let cases: Vec<(TextToImageOptions, &str)> = vec![
        (
            TextToImageOptions {
                width: Some(12),
                ..golden_options()
            },
            "width",
        ),
        (
            TextToImageOptions {
                height: Some(0),
                ..golden_options()
            },
            "height",
        ),
        (
            TextToImageOptions {
                steps: 0,
                ..golden_options()
            },
            "steps",
        ),
        (
            TextToImageOptions {
                batch: 0,
                ..golden_options()
            },
            "batch",
        ),
        (
            TextToImageOptions {
                clip_skip: 2,
                ..golden_options()
            },
            "clip_skip",
        ),
    ];
    for (options, want) in cases {
        match pipe.generate(&options, None, &mut |_| {}) {
            Err(TextToImageError::InvalidOption { option, reason }) => {
                assert_eq!(option, want, "{reason}");
            }
            other => panic!(
                "{want}: expected InvalidOption, got {:?}",
                other.map(|_| ())
            ),
        }
    }
    // latents of the wrong size for the requested image
    let latents = Cpu::default().zeros_like(&(1usize, 4usize, 8usize, 8usize));
    let options = TextToImageOptions {
        width: Some(24),
        ..golden_options()
    };
    match pipe.generate(&options, Some(latents), &mut |_| {}) {
        Err(TextToImageError::InvalidOption { option, reason }) => {
            assert_eq!(option, "init_latents");
            assert!(reason.contains("[1, 4, 8, 12]"), "{reason}");
        }
        other => panic!("expected InvalidOption, got {:?}", other.map(|_| ())),
    }
}

/// With the initial latents given, only the ancestral sampler still draws from the seed.
#[test]
fn ancestral_noise_comes_from_the_seed() {
    let pipe = diffusers_pipeline();
    let (init, shape) = golden("initial_latents");
    let init = Cpu::default().tensor_from_vec(init, (shape[0], shape[1], shape[2], shape[3]));
    let run = |sampler, seed| {
        let options = TextToImageOptions {
            sampler,
            seed,
            ..golden_options()
        };
        pipe.generate(&options, Some(init.clone()), &mut |_| {})
            .unwrap()
            .latents
            .as_vec()
    };
    assert_eq!(run(SamplerKind::Euler, 1), run(SamplerKind::Euler, 2));
    let diff = max_abs_diff(
        &run(SamplerKind::EulerAncestral, 1),
        &run(SamplerKind::EulerAncestral, 2),
    );
    println!("euler_a with fixed initial latents, seed 1 vs 2: max abs difference {diff:.3e}");
    assert!(diff > 1e-3);
}

/// Nothing is tied to the fixture's architecture: a 3-level UNet (linear projections, 2
/// transformer layers), a 3-level VAE (factor 4) and a 3-layer text encoder with synthetic
/// weights generate non-square batches, and the size rule follows the total downsampling.
#[test]
fn other_architectures_generate() {
    use sdpipe::diffusion::clip::{ClipConfig, TextEncoder};
    use sdpipe::diffusion::schedulers::SchedulerConfig;
    use sdpipe::diffusion::tokenizer::ClipTokenizer;
    use sdpipe::diffusion::unet::{PerLevel, UNet, UNetConfig};
    use sdpipe::diffusion::vae::{Vae, VaeConfig};
    use sdpipe::diffusion::{
        checkpoint::StableDiffusion,
        nn::weights::{Loader, WeightStore},
    };

    let dev = Cpu::default();
    let store = WeightStore::synthetic(21);
    let l = Loader::new(&store, &dev);
    let clip = ClipConfig {
        hidden_size: 24,
        intermediate_size: 48,
        num_hidden_layers: 3,
        num_attention_heads: 3,
        ..ClipConfig::default()
    };
    let unet = UNetConfig {
        block_out_channels: vec![16, 32, 32],
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
        layers_per_block: 1,
        attention_head_dim: PerLevel::Each(vec![2, 4, 4]),
        cross_attention_dim: 24,
        norm_num_groups: 4,
        use_linear_projection: true,
        transformer_layers_per_block: PerLevel::One(2),
        sample_size: 4,
        ..UNetConfig::default()
    };
    let vae = VaeConfig {
        block_out_channels: vec![8, 16, 16],
        layers_per_block: 1,
        norm_num_groups: 4,
        ..VaeConfig::default()
    };
    let models = StableDiffusion {
        text_encoders: vec![TextEncoder::load(&l.pp("te"), &clip).unwrap()],
        unet: UNet::load(&l.pp("unet"), &unet).unwrap(),
        vae: Vae::load(&l.pp("vae"), &vae).unwrap(),
    };
    let pipe = TextToImage::new(
        models,
        ClipTokenizer::bundled().unwrap(),
        SchedulerConfig::sd15(),
    );
    // VAE factor 4 x UNet 2^2 = 16
    assert_eq!(pipe.vae_factor(), 4);
    assert_eq!(pipe.size_multiple(), 16);
    assert_eq!(pipe.default_size(), (16, 16));
    let options = TextToImageOptions {
        prompt: "a red square".into(),
        width: Some(32),
        height: Some(48),
        steps: 3,
        batch: 2,
        clip_skip: 1,
        ..TextToImageOptions::default()
    };
    let mut steps = 0;
    let g = pipe
        .generate(&options, None, &mut |p| {
            assert_eq!(*p.latents.shape(), (2, 4, 12, 8));
            steps += 1;
        })
        .unwrap();
    assert_eq!(steps, 3);
    assert_eq!(*g.latents.shape(), (2, 4, 12, 8));
    assert_eq!(*g.images.shape(), (2, 3, 48, 32));
    let pixels = g.images.as_vec();
    assert!(pixels.iter().all(|v| (0.0..=1.0).contains(v)));
    let half = pixels.len() / 2;
    assert_ne!(
        &pixels[..half],
        &pixels[half..],
        "the two seeds gave one image"
    );
    // a multiple of 8 that the model cannot take
    let bad = TextToImageOptions {
        width: Some(24),
        ..options
    };
    match pipe.generate(&bad, None, &mut |_| {}) {
        Err(TextToImageError::InvalidOption { option, reason }) => {
            assert_eq!(option, "width");
            assert!(reason.contains("multiple of 16"), "{reason}");
        }
        other => panic!("expected InvalidOption, got {:?}", other.map(|_| ())),
    }
}
