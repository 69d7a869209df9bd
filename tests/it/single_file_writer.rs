//! The single-file checkpoint writer: the tiny diffusers model written in the original layout
//! reads back with identical tensors (f32) or within f16 rounding (f16), gives the same UNet
//! output, and equal tensors give equal bytes.

use std::collections::BTreeMap;
use std::path::Path;

use dfdx::prelude::*;
use sdpipe::diffusion::{Checkpoint, CheckpointLayout};
use sdpipe::formats::checkpoint::{ModelTensors, SaveDtype, write_single_file};
use sdpipe::formats::read_safetensors;

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

fn unet_output(ckpt: &Checkpoint) -> Vec<f32> {
    let golden = read_safetensors(&fixtures().join("goldens/unet.safetensors"))
        .unwrap()
        .tensors;
    let dev = Cpu::default();
    let unet = ckpt.load_unet(&dev).unwrap();
    let s = &golden["sample"];
    let c = &golden["encoder_hidden_states"];
    let sample = dev.tensor_from_vec(
        s.data.clone(),
        (s.shape[0], s.shape[1], s.shape[2], s.shape[3]),
    );
    let context = dev.tensor_from_vec(c.data.clone(), (c.shape[0], c.shape[1], c.shape[2]));
    unet.forward(sample, &golden["timesteps"].data, context)
        .unwrap()
        .as_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn diffusers_folder_written_as_single_file_reads_back_identically() {
    let folder = fixtures().join("tiny-sd");
    let base = Checkpoint::open(&folder).unwrap();
    let tensors = ModelTensors::read(&base).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let meta: BTreeMap<String, String> = [("note".to_string(), "test".to_string())].into();
    let base_out = unet_output(&base);

    for dtype in [SaveDtype::F32, SaveDtype::F16] {
        let path = dir.path().join(format!("model-{dtype:?}.safetensors"));
        write_single_file(&path, &tensors, &base.configs(), dtype, &meta).unwrap();
        let back = Checkpoint::open(&path)
            .unwrap()
            .with_configs_from(&folder)
            .unwrap();
        assert_eq!(back.layout, CheckpointLayout::SingleFile);
        let read = ModelTensors::read(&back).unwrap();
        assert_eq!(read.len(), tensors.len(), "{dtype:?}: tensor count");
        let mut worst = 0.0f32;
        for (a, b) in [
            (&tensors.unet, &read.unet),
            (&tensors.vae, &read.vae),
            (&tensors.text_encoder, &read.text_encoder),
        ] {
            for (name, t) in a {
                let r = b.get(name).unwrap_or_else(|| panic!("{name} missing"));
                assert_eq!(r.shape, t.shape, "{name}");
                for (x, y) in t.data.iter().zip(&r.data) {
                    assert_eq!(dtype.round(*x), *y, "{dtype:?} {name}");
                    worst = worst.max((x - y).abs());
                }
            }
        }
        let out = unet_output(&back);
        let err = max_diff(&out, &base_out);
        println!("{dtype:?}: max tensor change {worst:e}, UNet output max abs diff {err:e}");
        match dtype {
            SaveDtype::F32 => assert_eq!(err, 0.0),
            SaveDtype::F16 => assert!(err < 2e-2, "f16 UNet output drifted by {err}"),
        }

        // The original layout: VAE attention as 1x1 convs, position ids as int64, metadata kept.
        let raw = sdpipe::diffusion::nn::weights::SafetensorsFile::open(&path).unwrap();
        assert_eq!(
            raw.shape("first_stage_model.encoder.mid.attn_1.q.weight"),
            Some(vec![32, 32, 1, 1])
        );
        assert_eq!(
            raw.shape("cond_stage_model.transformer.text_model.embeddings.position_ids"),
            Some(vec![1, 77])
        );
        assert!(
            raw.shape("model.diffusion_model.output_blocks.1.1.conv.weight")
                .is_some()
        );
        assert_eq!(
            raw.user_metadata()
                .and_then(|m| m.get("note"))
                .map(String::as_str),
            Some("test")
        );

        // Deterministic bytes.
        let again = dir.path().join("again.safetensors");
        write_single_file(&again, &tensors, &base.configs(), dtype, &meta).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(&again).unwrap()
        );
    }
}

#[test]
fn the_fixture_single_file_rewrites_to_the_same_keys_and_shapes() {
    let src = fixtures().join("tiny-sd-single-file.safetensors");
    let ckpt = Checkpoint::open(&src)
        .unwrap()
        .with_configs_from(fixtures().join("tiny-sd"))
        .unwrap();
    let tensors = ModelTensors::read(&ckpt).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rewritten.safetensors");
    write_single_file(
        &out,
        &tensors,
        &ckpt.configs(),
        SaveDtype::F16,
        &BTreeMap::new(),
    )
    .unwrap();
    let a = sdpipe::diffusion::nn::weights::SafetensorsFile::open(&src).unwrap();
    let b = sdpipe::diffusion::nn::weights::SafetensorsFile::open(&out).unwrap();
    let mut names_a = a.names();
    let mut names_b = b.names();
    names_a.sort();
    names_b.sort();
    assert_eq!(names_a, names_b);
    for n in &names_a {
        assert_eq!(a.shape(n), b.shape(n), "{n}");
        if !n.ends_with("position_ids") {
            assert_eq!(a.read_f32(n).unwrap(), b.read_f32(n).unwrap(), "{n}");
        }
    }
}
