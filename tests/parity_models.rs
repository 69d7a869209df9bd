//! Parity of the SD 1.x models against the diffusers/transformers goldens in tests/fixtures
//! (copied from the shared reference fixtures; tolerances from their README).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dfdx::prelude::*;
use safetensors::SafeTensors;
use sdpipe::diffusion::clip::{ClipConfig, TextEncoder};
use sdpipe::diffusion::weights::{Loader, SafetensorsFile, WeightStore};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A golden file's tensors: f32 values (integers converted) and shapes.
struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    fn open(name: &str) -> Self {
        let path = fixtures().join("goldens").join(name);
        Self {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
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

    fn i64(&self, name: &str) -> (Vec<i64>, Vec<usize>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap();
        let v = t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (v, t.shape().to_vec())
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) })
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let err = max_abs_diff(got, want);
    println!("{what}: max abs error {err:.3e} (tolerance {tol:.0e})");
    assert!(err <= tol, "{what}: max abs error {err} > {tol}");
}

#[test]
fn text_encoder_matches_transformers() {
    let dev = Cpu::default();
    let dir = fixtures().join("tiny-sd/text_encoder");
    let file = Arc::new(SafetensorsFile::open(dir.join("model.safetensors")).unwrap());
    let store = WeightStore::from_files(vec![file], "text_model.");
    let config: ClipConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let te = TextEncoder::load(&Loader::new(&store, &dev), &config).unwrap();

    let g = Golden::open("text_encoder.safetensors");
    let (ids, shape) = g.i64("input_ids");
    let ids: Vec<Vec<u32>> = ids.chunks(shape[1]).map(|r| r.iter().map(|&i| i as u32).collect()).collect();
    let out = te.forward(&ids).unwrap();
    assert_close("text encoder last_hidden_state", &out.last_hidden_state.as_vec(), &g.f32("last_hidden_state").0, 1e-4);
    assert_close("text encoder pooler_output", &out.pooler_output.as_vec(), &g.f32("pooler_output").0, 1e-4);
    assert_close(
        "text encoder penultimate_hidden_state_final_ln",
        &out.penultimate_hidden_state_final_ln.as_vec(),
        &g.f32("penultimate_hidden_state_final_ln").0,
        1e-4,
    );
    // clip_skip through the embedding path gives the same tensors
    let skip1 = te.encode(&ids, 1).unwrap();
    assert_close("text encoder clip_skip=1", &skip1.as_vec(), &g.f32("penultimate_hidden_state_final_ln").0, 1e-4);
}

fn unet_parity(unet: &sdpipe::diffusion::unet::UNet<Cpu>, what: &str) {
    let dev = Cpu::default();
    let g = Golden::open("unet.safetensors");
    let (sample, ss) = g.f32("sample");
    let (ctx, cs) = g.f32("encoder_hidden_states");
    let (ts, _) = g.f32("timesteps");
    let sample = dev.tensor_from_vec(sample, (ss[0], ss[1], ss[2], ss[3]));
    let ctx = dev.tensor_from_vec(ctx, (cs[0], cs[1], cs[2]));
    let out = unet.forward(sample, &ts, ctx).unwrap();
    assert_close(what, &out.as_vec(), &g.f32("noise_pred").0, 1e-4);
}

#[test]
fn unet_matches_diffusers() {
    let dev = Cpu::default();
    let dir = fixtures().join("tiny-sd/unet");
    let file = Arc::new(SafetensorsFile::open(dir.join("diffusion_pytorch_model.safetensors")).unwrap());
    let store = WeightStore::from_files(vec![file], "");
    let config: sdpipe::diffusion::unet::UNetConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let unet = sdpipe::diffusion::unet::UNet::load(&Loader::new(&store, &dev), &config).unwrap();
    unet_parity(&unet, "unet noise_pred (diffusers folder)");
}

fn vae_parity(vae: &sdpipe::diffusion::vae::Vae<Cpu>, what: &str) {
    let dev = Cpu::default();
    let g = Golden::open("vae.safetensors");
    let (image, s) = g.f32("image");
    let post = vae.encode(dev.tensor_from_vec(image, (s[0], s[1], s[2], s[3]))).unwrap();
    assert_close(&format!("vae latent_mean ({what})"), &post.mean.as_vec(), &g.f32("latent_mean").0, 1e-4);
    assert_close(&format!("vae latent_logvar ({what})"), &post.logvar.as_vec(), &g.f32("latent_logvar").0, 1e-4);
    assert_close(&format!("vae latent_std ({what})"), &post.std.as_vec(), &g.f32("latent_std").0, 1e-4);
    let (z, s) = g.f32("decode_latent");
    let decoded = vae.decode(dev.tensor_from_vec(z, (s[0], s[1], s[2], s[3]))).unwrap();
    assert_close(&format!("vae decoded ({what})"), &decoded.as_vec(), &g.f32("decoded").0, 1e-4);
}

#[test]
fn vae_matches_diffusers() {
    let dev = Cpu::default();
    let dir = fixtures().join("tiny-sd/vae");
    let file = Arc::new(SafetensorsFile::open(dir.join("diffusion_pytorch_model.safetensors")).unwrap());
    let store = WeightStore::from_files(vec![file], "");
    let config: sdpipe::diffusion::vae::VaeConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vae = sdpipe::diffusion::vae::Vae::load(&Loader::new(&store, &dev), &config).unwrap();
    vae_parity(&vae, "diffusers folder");
}
