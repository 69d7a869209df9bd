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

/// A kohya LoCon file (rank-2 adapters on every convolution of the UNet, 3×3 ResNet and
/// sampler convs as well as the 1×1 transformer projections, and on the feed-forwards) reads
/// back to the network written, and the unmerged adapters give the UNet output of the weights
/// it is merged into, which differs from the base model's.
#[test]
fn locon_file_installs_and_merges_alike() {
    use sdpipe::formats::HostTensor;
    use sdpipe::formats::lora::{KohyaMetadata, LoraModule, LoraNetwork, write_kohya};
    use sdpipe::train::lora::{extract, install, lora_modules, merge_into_unet};

    let dev = Cpu::default();
    let folder = fixtures().join("tiny-sd");
    let base = Checkpoint::open(&folder).unwrap();
    let mut unet = base.load_unet(&dev).unwrap();
    let mut network = LoraNetwork::default();
    let modules = lora_modules(&mut unet);
    let mut convs = 0;
    for (i, (name, weight)) in modules.iter().enumerate() {
        if !(weight.len() == 4 || name.contains(".ff.")) {
            continue;
        }
        convs += usize::from(weight.len() == 4);
        let mut module = LoraModule::init(weight, 2, 1.0, i as u64).unwrap();
        let n = module.up.numel();
        module.up = HostTensor::new(
            module.up.shape.clone(),
            (0..n)
                .map(|k| ((k * 7 + i) % 13) as f32 / 13.0 - 0.5)
                .collect(),
        )
        .unwrap();
        network.unet.insert(name.clone(), module.into());
    }
    assert!(convs > 20, "{convs} convolutions adapted");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locon.safetensors");
    write_kohya(&path, &network, &KohyaMetadata::default()).unwrap();
    let known = known_modules(&ModelTensors::read(&base).unwrap());
    let (read, _) = read_lora(&path, Some(&known)).unwrap();
    assert_eq!(read, network, "the file reads back to the network written");

    let (b, c, side) = (2, unet.config.in_channels, 8);
    let d = unet.config.cross_attention_dim;
    let v = |n: usize, k: f32| (0..n).map(|i| (i as f32 * k).sin()).collect::<Vec<_>>();
    let sample = dev.tensor_from_vec(v(b * c * side * side, 0.31), (b, c, side, side));
    let context = dev.tensor_from_vec(v(b * 7 * d, 0.17), (b, 7, d));
    let t = [10.0, 600.0];
    let run = |u: &sdpipe::diffusion::UNet<Cpu>| {
        u.forward(sample.clone(), &t, context.clone())
            .unwrap()
            .as_vec()
    };
    let plain = run(&unet);
    install(&mut unet, &read, 0.8, &dev).unwrap();
    let unmerged = run(&unet);
    let mut back = extract(&mut unet, 1.0);
    for m in back.unet.values_mut() {
        if let Some(m) = m.as_lora_mut() {
            m.alpha = 1.0;
        }
    }
    assert_eq!(
        back.unet, network.unet,
        "the installed adapters extract as read"
    );

    let mut merged_unet = base.load_unet(&dev).unwrap();
    merge_into_unet(&mut merged_unet, &read, 0.8).unwrap();
    let merged = run(&merged_unet);
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    let (err, change) = (max_diff(&unmerged, &merged), max_diff(&plain, &merged));
    println!("LoCon: unmerged vs merged {err:e}, merged vs base {change:e}");
    assert!(err <= 1e-5, "unmerged vs merged {err}");
    assert!(
        change > 1e-2,
        "the LoCon changes the output by {change} only"
    );
}
