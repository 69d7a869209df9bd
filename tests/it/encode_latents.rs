//! The encode_latents stage on the tiny fixture model: per-item caching, both checkpoint
//! layouts, and the stored latents equal a direct VAE encode of the preprocessed tensor.

use crate::common::{PipelineToml, Project};
use dfdx::prelude::*;
use sdpipe::diffusion::Checkpoint;

/// The shared caption → preprocess → latents start (seed 0, the default) on
/// `tests/fixtures/<model>`, with `model_config = tests/fixtures/<config>` when given.
fn pipeline(model: &str, config: Option<&str>) -> PipelineToml {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let text =
        PipelineToml::tiny_latents(0).set("pipeline.base_model", format!("{fixtures}/{model}"));
    match config {
        Some(c) => text.set("pipeline.model_config", format!("{fixtures}/{c}")),
        None => text,
    }
}

fn f32_tensor(path: &std::path::Path, name: &str) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(name).unwrap();
    let data = v
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (data, v.shape().to_vec())
}

#[test]
fn latents_are_cached_per_item_and_equal_a_direct_encode() {
    let p = Project::new(pipeline("tiny-sd", None));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(p.stats("latents")["items_computed"], 6);

    // The stored mean equals encoding the preprocessed tensor directly.
    let (image, shape) = f32_tensor(
        &p.path("outputs/t/preprocess/items/zorb-01.png.safetensors"),
        "image",
    );
    assert_eq!(shape, vec![3, 16, 16]);
    let dev = Cpu::default();
    let vae = Checkpoint::open(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tiny-sd"
    ))
    .unwrap()
    .load_vae(&dev)
    .unwrap();
    let post = vae
        .encode(dev.tensor_from_vec(image, (1, 3, 16, 16)))
        .unwrap();
    let (mean, mshape) = f32_tensor(
        &p.path("outputs/t/latents/latents/zorb-01.png.safetensors"),
        "mean",
    );
    let (std, _) = f32_tensor(
        &p.path("outputs/t/latents/latents/zorb-01.png.safetensors"),
        "std",
    );
    assert_eq!(mshape, vec![4, 8, 8]);
    assert_eq!(mean, post.mean.as_vec());
    assert_eq!(std, post.std.as_vec());

    // One more image: one more encode.
    p.add_image("extra.png", 3);
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);
    assert_eq!(p.stats("latents")["items_computed"], 1);
    assert_eq!(p.stats("latents")["items_reused"], 6);
}

#[test]
fn single_file_and_diffusers_folder_give_the_same_latents() {
    let folder = Project::new(pipeline("tiny-sd", None));
    assert_eq!(folder.sdpipe(&["run", "p.toml"]).code, 0);
    let single = Project::new(pipeline("tiny-sd-single-file.safetensors", Some("tiny-sd")));
    let run = single.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let a = std::fs::read(folder.path("outputs/t/latents/manifest.json")).unwrap();
    let b = std::fs::read(single.path("outputs/t/latents/manifest.json")).unwrap();
    assert_eq!(
        a, b,
        "the fp16 single file holds the same (f16-rounded) weights"
    );
}

#[test]
fn a_model_stage_without_base_model_is_a_pipeline_error() {
    let text = pipeline("tiny-sd", None).remove("pipeline.base_model");
    let p = Project::new(&text);
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains("stage `latents` needs a model but [pipeline] has no `base_model`"),
        "{}",
        run.stderr
    );
    let p = Project::new(pipeline("no-such-model.safetensors", None));
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("p.toml:4:1:") && run.stderr.contains("does not exist"),
        "{}",
        run.stderr
    );
}
