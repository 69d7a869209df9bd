//! The UNet with the fixture LoRA applied, from the kohya, diffusers and PEFT files, at scale
//! 1.0 and 0.5, merged into the weights and as unmerged adapters, against diffusers + peft.

use std::path::Path;

use dfdx::prelude::*;
use sdpipe::diffusion::Checkpoint;
use sdpipe::formats::lora::read_lora;
use sdpipe::formats::read_safetensors;
use sdpipe::train::lora::{install, merge_into_unet};

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

#[test]
fn unet_with_the_fixture_lora_matches_peft() {
    let golden = read_safetensors(&fixtures().join("goldens/lora.safetensors"))
        .unwrap()
        .tensors;
    let dev = Cpu::default();
    let base = Checkpoint::open(fixtures().join("tiny-sd"))
        .unwrap()
        .load_unet(&dev)
        .unwrap();
    let s = &golden["sample"];
    let c = &golden["encoder_hidden_states"];
    let t: Vec<f32> = golden["timesteps"].data.clone();
    let sample = dev.tensor_from_vec(
        s.data.clone(),
        (s.shape[0], s.shape[1], s.shape[2], s.shape[3]),
    );
    let context = dev.tensor_from_vec(c.data.clone(), (c.shape[0], c.shape[1], c.shape[2]));
    let mut worst = 0.0f32;
    for file in ["lora_kohya.safetensors", "lora_diffusers", "lora_peft"] {
        let (network, _) = read_lora(&fixtures().join("lora").join(file), None).unwrap();
        for (scale, key) in [
            (1.0f32, "noise_pred_lora_scale1"),
            (0.5, "noise_pred_lora_scale0.5"),
        ] {
            let expected = &golden[key].data;
            let mut merged = base.clone();
            merge_into_unet(&mut merged, &network, scale).unwrap();
            let mut adapted = base.clone();
            install(&mut adapted, &network, scale, &dev).unwrap();
            for (how, unet) in [("merged", &merged), ("adapter", &adapted)] {
                let out = unet
                    .forward(sample.clone(), &t, context.clone())
                    .unwrap()
                    .as_vec();
                let err = out
                    .iter()
                    .zip(expected)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(err <= 1e-4, "{file} at {scale} ({how}): max error {err}");
                worst = worst.max(err);
            }
        }
    }
    println!("max abs error over 3 formats × 2 scales × merged/adapter: {worst:e}");
}
