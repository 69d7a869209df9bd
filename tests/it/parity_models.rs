//! Parity of the SD 1.x models against the diffusers/transformers goldens in tests/fixtures
//! (copied from the shared reference fixtures; tolerances from their README).

use std::path::{Path, PathBuf};

use dfdx::prelude::*;
use safetensors::SafeTensors;
use sdpipe::diffusion::checkpoint::{Checkpoint, CheckpointLayout, StableDiffusion};
use sdpipe::diffusion::clip::TextEncoder;
use sdpipe::diffusion::error::DiffusionError;
use sdpipe::diffusion::unet::UNet;
use sdpipe::diffusion::vae::Vae;

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
        .fold(
            0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let err = max_abs_diff(got, want);
    println!("{what}: max abs error {err:.3e} (tolerance {tol:.0e})");
    assert!(err <= tol, "{what}: max abs error {err} > {tol}");
}

fn diffusers() -> Checkpoint {
    let ckpt = Checkpoint::open(fixtures().join("tiny-sd")).unwrap();
    assert_eq!(ckpt.layout, CheckpointLayout::Diffusers);
    ckpt
}

/// The single file with the tiny model's configs: its 4 CLIP heads and 8 GroupNorm groups
/// differ from SD 1.x's, which is all a single file's shapes cannot tell.
fn single_file() -> Checkpoint {
    let ckpt = Checkpoint::open(fixtures().join("tiny-sd-single-file.safetensors")).unwrap();
    assert_eq!(ckpt.layout, CheckpointLayout::SingleFile);
    ckpt.with_configs_from(fixtures().join("tiny-sd")).unwrap()
}

fn text_encoder_parity(te: &TextEncoder<Cpu>, what: &str) {
    let g = Golden::open("text_encoder.safetensors");
    let (ids, shape) = g.i64("input_ids");
    let ids: Vec<Vec<u32>> = ids
        .chunks(shape[1])
        .map(|r| r.iter().map(|&i| i as u32).collect())
        .collect();
    let out = te.forward(&ids).unwrap();
    assert_close(
        &format!("text encoder last_hidden_state ({what})"),
        &out.last_hidden_state.as_vec(),
        &g.f32("last_hidden_state").0,
        1e-4,
    );
    assert_close(
        &format!("text encoder pooler_output ({what})"),
        &out.pooler_output.as_vec(),
        &g.f32("pooler_output").0,
        1e-4,
    );
    assert_close(
        &format!("text encoder penultimate_hidden_state_final_ln ({what})"),
        &out.penultimate_hidden_state_final_ln.as_vec(),
        &g.f32("penultimate_hidden_state_final_ln").0,
        1e-4,
    );
    // clip_skip through the embedding-input path gives the same tensors
    let skip1 = te.encode(&ids, 1).unwrap();
    assert_close(
        &format!("text encoder clip_skip=1 ({what})"),
        &skip1.as_vec(),
        &g.f32("penultimate_hidden_state_final_ln").0,
        1e-4,
    );
    let skip0 = te
        .forward_embeds(te.embed_tokens(&ids).unwrap(), 0)
        .unwrap();
    assert_close(
        &format!("text encoder forward_embeds ({what})"),
        &skip0.as_vec(),
        &g.f32("last_hidden_state").0,
        1e-4,
    );
}

fn unet_parity(unet: &UNet<Cpu>, what: &str) {
    let dev = Cpu::default();
    let g = Golden::open("unet.safetensors");
    let (sample, ss) = g.f32("sample");
    let (ctx, cs) = g.f32("encoder_hidden_states");
    let (ts, _) = g.f32("timesteps");
    let sample = dev.tensor_from_vec(sample, (ss[0], ss[1], ss[2], ss[3]));
    let ctx = dev.tensor_from_vec(ctx, (cs[0], cs[1], cs[2]));
    let out = unet.forward(sample, &ts, ctx).unwrap();
    assert_close(
        &format!("unet noise_pred ({what})"),
        &out.as_vec(),
        &g.f32("noise_pred").0,
        1e-4,
    );
}

fn vae_parity(vae: &Vae<Cpu>, what: &str) {
    let dev = Cpu::default();
    let g = Golden::open("vae.safetensors");
    let (image, s) = g.f32("image");
    let post = vae
        .encode(dev.tensor_from_vec(image, (s[0], s[1], s[2], s[3])))
        .unwrap();
    assert_close(
        &format!("vae latent_mean ({what})"),
        &post.mean.as_vec(),
        &g.f32("latent_mean").0,
        1e-4,
    );
    assert_close(
        &format!("vae latent_logvar ({what})"),
        &post.logvar.as_vec(),
        &g.f32("latent_logvar").0,
        1e-4,
    );
    assert_close(
        &format!("vae latent_std ({what})"),
        &post.std.as_vec(),
        &g.f32("latent_std").0,
        1e-4,
    );
    let (z, s) = g.f32("decode_latent");
    let decoded = vae
        .decode(dev.tensor_from_vec(z, (s[0], s[1], s[2], s[3])))
        .unwrap();
    assert_close(
        &format!("vae decoded ({what})"),
        &decoded.as_vec(),
        &g.f32("decoded").0,
        1e-4,
    );
}

#[test]
fn text_encoder_matches_transformers() {
    let dev = Cpu::default();
    text_encoder_parity(
        &diffusers().load_text_encoder(&dev).unwrap(),
        "diffusers folder",
    );
    text_encoder_parity(
        &single_file().load_text_encoder(&dev).unwrap(),
        "single file",
    );
}

#[test]
fn unet_matches_diffusers() {
    let dev = Cpu::default();
    unet_parity(&diffusers().load_unet(&dev).unwrap(), "diffusers folder");
    unet_parity(&single_file().load_unet(&dev).unwrap(), "single file");
}

#[test]
fn vae_matches_diffusers() {
    let dev = Cpu::default();
    vae_parity(&diffusers().load_vae(&dev).unwrap(), "diffusers folder");
    vae_parity(&single_file().load_vae(&dev).unwrap(), "single file");
}

#[test]
fn stable_diffusion_load_builds_all_models() {
    let dev = Cpu::default();
    let sd = StableDiffusion::load(fixtures().join("tiny-sd"), &dev).unwrap();
    assert_eq!(sd.unet.config.block_out_channels, vec![32, 64]);
    assert_eq!(sd.vae.config.scaling_factor, 0.18215);
    assert_eq!(sd.vae.config.downsampling_factor(), 2);
    assert_eq!(sd.text_encoder().config.num_attention_heads, 4);
}

/// Every tensor of the fp16 single file, mapped to diffusers names, equals the f32 diffusers
/// folder exactly (the fixture's values are all f16-representable).
#[test]
fn single_file_tensors_equal_diffusers_folder() {
    let a = diffusers();
    let b = Checkpoint::open(fixtures().join("tiny-sd-single-file.safetensors")).unwrap();
    let pairs = [
        ("unet", a.unet_weights(), b.unet_weights()),
        ("vae", a.vae_weights(), b.vae_weights()),
        (
            "text_encoder",
            a.text_encoder_weights(),
            b.text_encoder_weights(),
        ),
    ];
    let mut count = 0;
    for (component, da, sb) in pairs {
        let na: Vec<&str> = da.names().collect();
        let nb: Vec<&str> = sb.names().collect();
        assert_eq!(na, nb, "{component}: tensor names differ");
        for name in na {
            let (va, sa) = da.read(name).unwrap();
            let (vb, sbs) = sb.read(name).unwrap();
            assert_eq!(sa, sbs, "{component} {name}: shape");
            assert!(
                va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{component} {name}: values differ"
            );
            count += 1;
        }
    }
    assert_eq!(count, 400, "the fixture has 400 weight tensors");
}

/// What can be inferred from the single file's shapes alone.
#[test]
fn single_file_architecture_is_inferred_from_shapes() {
    let inferred = Checkpoint::open(fixtures().join("tiny-sd-single-file.safetensors")).unwrap();
    let reference = diffusers();
    let (u, r) = (&inferred.unet_config, &reference.unet_config);
    assert_eq!(u.block_out_channels, r.block_out_channels);
    assert_eq!(u.layers_per_block, r.layers_per_block);
    assert_eq!(u.down_block_types, r.down_block_types);
    assert_eq!(u.up_block_types, r.up_block_types);
    assert_eq!(u.cross_attention_dim, r.cross_attention_dim);
    assert_eq!(u.in_channels, r.in_channels);
    assert_eq!(u.out_channels, r.out_channels);
    assert_eq!(u.heads(0), r.heads(0));
    assert_eq!(u.use_linear_projection, r.use_linear_projection);
    let (v, rv) = (&inferred.vae_config, &reference.vae_config);
    assert_eq!(v.block_out_channels, rv.block_out_channels);
    assert_eq!(v.layers_per_block, rv.layers_per_block);
    assert_eq!(v.latent_channels, rv.latent_channels);
    assert_eq!(v.scaling_factor, 0.18215);
    let (c, rc) = (&inferred.clip_config, &reference.clip_config);
    assert_eq!(c.hidden_size, rc.hidden_size);
    assert_eq!(c.intermediate_size, rc.intermediate_size);
    assert_eq!(c.num_hidden_layers, rc.num_hidden_layers);
    assert_eq!(c.vocab_size, rc.vocab_size);
    assert_eq!(c.max_position_embeddings, rc.max_position_embeddings);
}

/// Writes a safetensors file holding `tensors` (name, f32 values, shape).
fn write_safetensors(path: &Path, tensors: Vec<(String, Vec<f32>, Vec<usize>)>) {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .into_iter()
        .map(|(n, v, s)| (n, v.iter().flat_map(|x| x.to_le_bytes()).collect(), s))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, b, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// The single file's tensors (as f32), optionally transformed.
fn single_file_tensors() -> Vec<(String, Vec<f32>, Vec<usize>)> {
    let path = fixtures().join("tiny-sd-single-file.safetensors");
    let f = sdpipe::diffusion::nn::weights::SafetensorsFile::open(&path).unwrap();
    f.names()
        .into_iter()
        .filter(|n| !n.ends_with("position_ids"))
        .map(|n| {
            let (v, s) = f.read_f32(&n).unwrap();
            (n, v, s)
        })
        .collect()
}

#[test]
fn truncated_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::read(fixtures().join("tiny-sd-single-file.safetensors")).unwrap();
    let path = dir.path().join("truncated.safetensors");
    std::fs::write(&path, &src[..src.len() / 2]).unwrap();
    let err = Checkpoint::open(&path).unwrap_err();
    assert!(matches!(err, DiffusionError::CorruptFile { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("truncated.safetensors") && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.safetensors");
    let removed = "model.diffusion_model.input_blocks.1.1.proj_out.weight";
    let tensors = single_file_tensors()
        .into_iter()
        .filter(|(n, _, _)| n != removed)
        .collect();
    write_safetensors(&path, tensors);
    let ckpt = Checkpoint::open(&path)
        .unwrap()
        .with_configs_from(fixtures().join("tiny-sd"))
        .unwrap();
    let err = ckpt.load_unet(&Cpu::default()).unwrap_err();
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, DiffusionError::MissingTensor { .. }), "{msg}");
    assert!(
        msg.contains("down_blocks.0.attentions.0.proj_out.weight"),
        "{msg}"
    );
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let mut ckpt = diffusers();
    ckpt.clip_config.intermediate_size = 128;
    let err = ckpt.load_text_encoder(&Cpu::default()).unwrap_err();
    let msg = err.to_string();
    println!("{msg}");
    match err {
        DiffusionError::ShapeMismatch {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, "encoder.layers.0.mlp.fc1.weight");
            assert_eq!(expected, vec![128, 32]);
            assert_eq!(found, vec![64, 32]);
        }
        other => panic!("expected a shape error, got {other}"),
    }
}

#[test]
fn sd2_and_sdxl_files_are_rejected_with_what_was_found() {
    let dir = tempfile::tempdir().unwrap();
    // SDXL: `conditioner.*` keys
    let sdxl = dir.path().join("sdxl.safetensors");
    let mut tensors = single_file_tensors();
    tensors.push((
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight".into(),
        vec![1.0; 4],
        vec![4],
    ));
    write_safetensors(&sdxl, tensors);
    let msg = Checkpoint::open(&sdxl).unwrap_err().to_string();
    println!("{msg}");
    assert!(
        msg.contains("conditioner.")
            && msg.contains("SDXL")
            && msg.contains("Stable Diffusion 1.x"),
        "{msg}"
    );

    // SD 2.x: 1024-wide cross-attention context
    let sd2 = dir.path().join("sd2.safetensors");
    let tensors = single_file_tensors()
        .into_iter()
        .map(|(n, v, s)| {
            if n.ends_with("attn2.to_k.weight") || n.ends_with("attn2.to_v.weight") {
                (n, vec![0.0; s[0] * 1024], vec![s[0], 1024])
            } else {
                (n, v, s)
            }
        })
        .collect();
    write_safetensors(&sd2, tensors);
    let msg = Checkpoint::open(&sd2).unwrap_err().to_string();
    println!("{msg}");
    assert!(
        msg.contains("1024") && msg.contains("SD 2.x") && msg.contains("Stable Diffusion 1.x"),
        "{msg}"
    );
}

/// Gradients reach the UNet's inputs through the tape (sample via the skip connections and
/// resnets, context via every cross-attention): checked against central finite differences.
#[test]
fn unet_gradients_reach_sample_and_context() {
    let dev = Cpu::default();
    let unet = diffusers().load_unet(&dev).unwrap();
    let g = Golden::open("unet.safetensors");
    let (sample, ss) = g.f32("sample");
    let (ctx, cs) = g.f32("encoder_hidden_states");
    let (ts, _) = g.f32("timesteps");
    let sshape = (ss[0], ss[1], ss[2], ss[3]);
    let cshape = (cs[0], cs[1], cs[2]);
    let weights: Vec<f32> = (0..sample.len())
        .map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5)
        .collect();
    let loss = |s: &[f32], c: &[f32]| -> f64 {
        let out = unet
            .forward(
                dev.tensor_from_vec(s.to_vec(), sshape),
                &ts,
                dev.tensor_from_vec(c.to_vec(), cshape),
            )
            .unwrap()
            .as_vec();
        out.iter()
            .zip(&weights)
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum()
    };
    let x = dev.tensor_from_vec(sample.clone(), sshape);
    let c = dev.tensor_from_vec(ctx.clone(), cshape);
    let out = unet.forward(x.leaky_trace(), &ts, c.retaped()).unwrap();
    let r = dev.tensor_from_vec(weights.clone(), sshape);
    let grads = (out * r).sum().backward();
    let gx = grads.get(&x).as_vec();
    let gc = grads.get(&c).as_vec();
    let eps = 1e-2f32;
    let mut worst = 0f64;
    for &i in &[0usize, 77, 300, 511] {
        let (mut p, mut m) = (sample.clone(), sample.clone());
        p[i] += eps;
        m[i] -= eps;
        let fd = (loss(&p, &ctx) - loss(&m, &ctx)) / (2.0 * eps as f64);
        worst = worst.max((fd - gx[i] as f64).abs() / fd.abs().max(1.0));
        assert!(
            (fd - gx[i] as f64).abs() < 2e-3 * fd.abs().max(1.0),
            "d/dsample[{i}]: tape {} vs {fd}",
            gx[i]
        );
    }
    for &i in &[0usize, 33, 2500, 4900] {
        let (mut p, mut m) = (ctx.clone(), ctx.clone());
        p[i] += eps;
        m[i] -= eps;
        let fd = (loss(&sample, &p) - loss(&sample, &m)) / (2.0 * eps as f64);
        worst = worst.max((fd - gc[i] as f64).abs() / fd.abs().max(1.0));
        assert!(
            (fd - gc[i] as f64).abs() < 2e-3 * fd.abs().max(1.0),
            "d/dcontext[{i}]: tape {} vs {fd}",
            gc[i]
        );
    }
    println!("unet input gradients: worst relative error vs finite differences {worst:.2e}");
}

/// Gradients reach the text encoder's input embeddings (what textual inversion trains).
#[test]
fn text_encoder_gradients_reach_embeddings() {
    let dev = Cpu::default();
    let te = diffusers().load_text_encoder(&dev).unwrap();
    let ids = vec![vec![49406u32, 320, 1125, 539, 48136, 1929, 49407, 49407]];
    let embeds = te.embed_tokens(&ids).unwrap();
    let shape = *embeds.shape();
    let base = embeds.as_vec();
    let weights: Vec<f32> = (0..base.len())
        .map(|i| ((i * 31) % 17) as f32 / 17.0 - 0.5)
        .collect();
    let loss = |v: &[f32]| -> f64 {
        let out = te
            .forward_embeds(dev.tensor_from_vec(v.to_vec(), shape), 0)
            .unwrap()
            .as_vec();
        out.iter()
            .zip(&weights)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum()
    };
    let out = te.forward_embeds(embeds.leaky_trace(), 0).unwrap();
    let r = dev.tensor_from_vec(weights.clone(), shape);
    let g = (out * r).sum().backward().get(&embeds).as_vec();
    let eps = 1e-2f32;
    let mut worst = 0f64;
    for &i in &[0usize, 40, 130, 200, 255] {
        let (mut p, mut m) = (base.clone(), base.clone());
        p[i] += eps;
        m[i] -= eps;
        let fd = (loss(&p) - loss(&m)) / (2.0 * eps as f64);
        let err = (fd - g[i] as f64).abs() / fd.abs().max(1.0);
        worst = worst.max(err);
        assert!(err < 2e-3, "d/dembeds[{i}]: tape {} vs {fd}", g[i]);
    }
    println!(
        "text encoder embedding gradients: worst relative error vs finite differences {worst:.2e}"
    );
}

/// Textual-inversion vectors as added tokens (diffusers numbering from 49408): the encoder's
/// output matches diffusers' `load_textual_inversion` pipeline.
#[test]
fn text_encoder_with_added_token_vectors_matches_diffusers() {
    let dev = Cpu::default();
    let te = diffusers().load_text_encoder(&dev).unwrap();
    let g = Golden::open("textual_inversion.safetensors");
    for (case, emb) in [("sks", "emb_sks"), ("cat_toy", "emb_cat_toy")] {
        let (ids, _) = g.i64(&format!("{case}.input_ids"));
        let ids = vec![ids.iter().map(|&i| i as u32).collect::<Vec<_>>()];
        let (vectors, shape) = g.f32(emb);
        let rows = if shape.len() == 2 { shape[0] } else { 1 };
        let extra = dev.tensor_from_vec(vectors, (rows, te.config.hidden_size));
        let embeds = te.embed_tokens_with_extra(&ids, extra).unwrap();
        let out = te.forward_embeds(embeds, 0).unwrap();
        assert_close(
            &format!("textual inversion {case} last_hidden_state"),
            &out.as_vec(),
            &g.f32(&format!("{case}.last_hidden_state")).0,
            1e-4,
        );
    }
}

/// The models inside the 4-step DDIM pipeline golden (schedulers aside): prompt embeddings,
/// the UNet on the [uncond, cond] batch at every step's latents, and the VAE decode of the
/// final latents, from both layouts.
#[test]
fn models_match_the_pipeline_golden() {
    let dev = Cpu::default();
    let g = Golden::open("pipeline_ddim4.safetensors");
    for (what, ckpt) in [
        ("diffusers folder", diffusers()),
        ("single file", single_file()),
    ] {
        let sd = ckpt.load(&dev).unwrap();
        let ids: Vec<Vec<u32>> = ["input_ids_uncond", "input_ids_cond"]
            .iter()
            .map(|k| g.i64(k).0.iter().map(|&i| i as u32).collect())
            .collect();
        let embeds = sd.text_encoder().encode(&ids, 0).unwrap();
        assert_close(
            &format!("pipeline prompt_embeds ({what})"),
            &embeds.as_vec(),
            &g.f32("prompt_embeds").0,
            1e-4,
        );
        let (ts, _) = g.i64("timesteps");
        let (initial, _) = g.f32("initial_latents");
        let (per_step, _) = g.f32("latents_per_step");
        let (uncond, _) = g.f32("noise_pred_uncond");
        let (cond, _) = g.f32("noise_pred_text");
        let n = initial.len();
        let mut worst = 0f32;
        for (i, &t) in ts.iter().enumerate() {
            let latents = if i == 0 {
                initial.clone()
            } else {
                per_step[(i - 1) * n..i * n].to_vec()
            };
            // the pipeline's batch: [uncond, cond] with the same latents
            let batch: Vec<f32> = latents.iter().chain(&latents).copied().collect();
            let out = sd
                .unet
                .forward(
                    dev.tensor_from_vec(batch, (2, 4, 8, 8)),
                    &[t as f32],
                    embeds.clone(),
                )
                .unwrap()
                .as_vec();
            worst = worst.max(max_abs_diff(&out[..n], &uncond[i * n..(i + 1) * n]));
            worst = worst.max(max_abs_diff(&out[n..], &cond[i * n..(i + 1) * n]));
        }
        println!(
            "pipeline unet noise_pred, 4 steps x [uncond, cond] ({what}): max abs error {worst:.3e}"
        );
        assert!(worst <= 1e-4, "pipeline unet: {worst}");
        let scale = sd.vae.config.scaling_factor as f32;
        let z: Vec<f32> = g.f32("final_latents").0.iter().map(|v| v / scale).collect();
        let decoded = sd.vae.decode(dev.tensor_from_vec(z, (1, 4, 8, 8))).unwrap();
        assert_close(
            &format!("pipeline decoded_raw ({what})"),
            &decoded.as_vec(),
            &g.f32("decoded_raw").0,
            1e-4,
        );
    }
}
