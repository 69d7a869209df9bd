//! Bad input to training and to the tools that use its results: each is a clear error that
//! names the thing (an empty dataset, a placeholder that is already a word, a LoRA made for
//! another architecture).

use std::collections::BTreeMap;

use crate::common::{PipelineToml, Project};
use sdpipe::formats::HostTensor;

/// Textual inversion of `token` on the captions of `images`.
fn pipeline(images: &str, token: &str) -> PipelineToml {
    PipelineToml::tiny_latents(5)
        .set("stage.caption.images", images)
        .set("stage.caption.token", token)
        .merge(toml::toml! {
            [stage.train]
            kind = "train"
            needs = ["latents"]
            method = "textual_inversion"
            steps = 3

            [stage.train.textual_inversion]
            init_word = "star"
        })
        .set("stage.train.textual_inversion.token", token)
}

#[test]
fn a_dataset_without_images_names_the_folder() {
    let p = Project::new(pipeline("empty", "zorb"));
    std::fs::create_dir_all(p.path("empty")).unwrap();
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(
        all.contains("no images in") && all.contains("empty"),
        "{all}"
    );
}

#[test]
fn a_placeholder_that_is_already_a_word_is_refused_unless_allowed() {
    let p = Project::new(pipeline("images", "dog"));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(
        all.contains("\"dog\" already exists in the vocabulary")
            && all.contains("allow_existing_token"),
        "{all}"
    );
    let p = Project::new(
        pipeline("images", "dog").set("stage.train.textual_inversion.allow_existing_token", true),
    );
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
}

#[test]
fn a_lora_for_another_architecture_names_the_module() {
    let p = Project::new(pipeline("images", "zorb"));
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");
    let sample = |lora: &std::path::Path| {
        p.sdpipe(&[
            "sample",
            "--model",
            model,
            "--prompt",
            "a photo",
            "--steps",
            "2",
            "--width",
            "16",
            "--height",
            "16",
            "--lora",
            lora.to_str().unwrap(),
            "--out",
            "x.png",
        ])
    };
    let write = |name: &str, module: &str, inp: usize, out: usize| {
        let path = p.path(name);
        let mut t = BTreeMap::new();
        t.insert(
            format!("{module}.lora_down.weight"),
            HostTensor::zeros(vec![4, inp]),
        );
        t.insert(
            format!("{module}.lora_up.weight"),
            HostTensor::zeros(vec![out, 4]),
        );
        t.insert(
            format!("{module}.alpha"),
            HostTensor::new(vec![], vec![4.0]).unwrap(),
        );
        sdpipe::formats::write_safetensors(&path, &t, None).unwrap();
        path
    };
    // SD 1.5 widths on a module the tiny model has: a shape error naming the module.
    let sd15 = write(
        "sd15.safetensors",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        320,
        320,
    );
    let run = sample(&sd15);
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr
            .contains("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
            && run.stderr.contains("sd15.safetensors"),
        "{}",
        run.stderr
    );
    // A module of a deeper UNet than this one: named, with the modules that exist.
    let deeper = write(
        "deeper.safetensors",
        "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn2_to_k",
        32,
        32,
    );
    let run = sample(&deeper);
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("down_blocks")
            && (run.stderr.contains("available") || run.stderr.contains("not")),
        "{}",
        run.stderr
    );
}
