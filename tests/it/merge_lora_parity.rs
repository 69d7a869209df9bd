//! The fixture LoRA baked into the tiny model's weights and written as a single-file checkpoint
//! gives the UNet output of diffusers + peft with the LoRA at scale w (the goldens), and that of
//! the unmerged adapters.

use std::collections::BTreeMap;
use std::path::Path;

use dfdx::prelude::*;
use sdpipe::diffusion::Checkpoint;
use sdpipe::formats::checkpoint::{ModelTensors, SaveDtype, write_single_file};
use sdpipe::formats::lora::read_lora;
use sdpipe::formats::read_safetensors;
use sdpipe::merge::{known_modules, merge_loras};

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

#[test]
fn lora_merged_into_a_checkpoint_matches_the_goldens_and_the_adapters() {
    let golden = read_safetensors(&fixtures().join("goldens/lora.safetensors"))
        .unwrap()
        .tensors;
    let dev = Cpu::default();
    let folder = fixtures().join("tiny-sd");
    let base = Checkpoint::open(&folder).unwrap();
    let tensors = ModelTensors::read(&base).unwrap();
    let known = known_modules(&tensors);
    let (network, _) = read_lora(
        &fixtures().join("lora/lora_kohya.safetensors"),
        Some(&known),
    )
    .unwrap();
    let s = &golden["sample"];
    let c = &golden["encoder_hidden_states"];
    let t: Vec<f32> = golden["timesteps"].data.clone();
    let sample = dev.tensor_from_vec(
        s.data.clone(),
        (s.shape[0], s.shape[1], s.shape[2], s.shape[3]),
    );
    let context = dev.tensor_from_vec(c.data.clone(), (c.shape[0], c.shape[1], c.shape[2]));
    let dir = tempfile::tempdir().unwrap();
    let mut worst = 0.0f32;
    for (scale, key) in [
        (1.0f32, "noise_pred_lora_scale1"),
        (0.5, "noise_pred_lora_scale0.5"),
    ] {
        let mut merged = tensors.clone();
        let changed = merge_loras(&mut merged, &[("fixture", &network, scale)]).unwrap();
        assert_eq!(changed, network.len());
        let path = dir.path().join(format!("merged-{scale}.safetensors"));
        write_single_file(
            &path,
            &merged,
            &base.configs(),
            SaveDtype::F32,
            &BTreeMap::new(),
        )
        .unwrap();
        let unet = Checkpoint::open(&path)
            .unwrap()
            .with_configs_from(&folder)
            .unwrap()
            .load_unet(&dev)
            .unwrap();
        let out = unet
            .forward(sample.clone(), &t, context.clone())
            .unwrap()
            .as_vec();
        let err = out
            .iter()
            .zip(&golden[key].data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            err <= 1e-4,
            "scale {scale}: max error {err} against the golden"
        );
        // the unmerged adapters on the base model
        let mut adapted = base.load_unet(&dev).unwrap();
        sdpipe::train::lora::install(&mut adapted, &network, scale, &dev).unwrap();
        let a = adapted
            .forward(sample.clone(), &t, context.clone())
            .unwrap()
            .as_vec();
        let err_adapter = out
            .iter()
            .zip(&a)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            err_adapter <= 1e-5,
            "scale {scale}: merged vs adapters {err_adapter}"
        );
        println!(
            "scale {scale}: merged checkpoint vs golden {err:e}, vs unmerged adapters {err_adapter:e}"
        );
        worst = worst.max(err);
    }
    println!("max abs error {worst:e}");
}
