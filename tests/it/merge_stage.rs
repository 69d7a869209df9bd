//! The `merge` stage in a pipeline on the tiny fixture model: a trained LoRA baked into a
//! checkpoint (which the grid samples as its own row, like the LoRA row), extracted back out,
//! combined with itself; and the errors that name what is wrong.

use crate::common::{PipelineToml, Project};
use sdpipe::formats::lora::read_lora;
use sdpipe::formats::read_safetensors;

fn fixtures() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")
}

/// A rank-4 LoRA `train` on the shared start, then the stages in `stages`.
fn pipeline(stages: toml::Table) -> PipelineToml {
    PipelineToml::tiny_latents(5)
        .merge(toml::toml! {
            [stage.train]
            kind = "train"
            needs = ["latents"]
            method = "lora"
            steps = 8
            lr = 1e-2
            checkpoint_every = 0

            [stage.train.lora]
            rank = 4
            alpha = 4
        })
        .merge(stages)
}

/// The merge stages of the main test, on the trained LoRA and the base.
fn merges() -> toml::Table {
    toml::toml! {
        [stage.baked]
        kind = "merge"
        needs = ["train"]
        mode = "lora_into_checkpoint"
        loras = ["train:1.0"]
        dtype = "f32"

        [stage.extracted]
        kind = "merge"
        needs = ["baked"]
        mode = "extract_lora"
        models = ["baked"]
        rank = 4
        clamp_quantile = 1.0

        [stage.combined]
        kind = "merge"
        needs = ["train"]
        mode = "combine_loras"
        loras = ["train:0.25", "train:0.75"]

        [stage.avg]
        kind = "merge"
        needs = ["baked"]
        mode = "weighted_sum"
        models = ["base", "baked"]
        alpha = 0.25
        dtype = "f32"

        [stage.diff]
        kind = "merge"
        needs = ["baked"]
        mode = "add_difference"
        models = ["base", "baked", "base"]
        alpha = 0.5
        dtype = "f32"
    }
}

fn max_module_diff(
    a: &sdpipe::formats::lora::LoraNetwork,
    b: &sdpipe::formats::lora::LoraNetwork,
) -> f32 {
    assert_eq!(
        a.unet.keys().collect::<Vec<_>>(),
        b.unet.keys().collect::<Vec<_>>()
    );
    a.unet
        .iter()
        .map(|(k, m)| {
            m.as_lora()
                .unwrap()
                .delta(1.0)
                .max_abs_diff(&b.unet[k].as_lora().unwrap().delta(1.0))
        })
        .fold(0.0, f32::max)
}

#[test]
fn lora_baked_extracted_combined_and_sampled_as_a_checkpoint_row() {
    let p = Project::new(pipeline(merges()).tiny_grid("grid", &["train", "baked"]));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);

    // the checkpoint carries its recipe, naming the LoRA by its hash
    let model = p.path("outputs/t/baked/model.safetensors");
    let file = read_safetensors(&model).unwrap();
    let recipe: serde_json::Value =
        serde_json::from_str(&file.metadata["sdpipe_merge_recipe"]).unwrap();
    assert_eq!(recipe["mode"], "lora_into_checkpoint");
    let lora_path = p.path("outputs/t/train/lora.safetensors");
    let lora_hash = blake3::hash(&std::fs::read(&lora_path).unwrap())
        .to_hex()
        .to_string();
    let lora_input = recipe["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["role"] == "lora")
        .unwrap();
    assert_eq!(lora_input["blake3"], lora_hash.as_str());
    assert_eq!(lora_input["weight"], 1.0);
    assert!(file.tensors.contains_key(
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    ));

    // the grid: base, the LoRA (adapters), the baked checkpoint (same image as the LoRA row)
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.path("outputs/t/grid/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(
        manifest["variants"],
        serde_json::json!(["base", "train", "baked"])
    );
    let img = |v: &str| {
        image::open(p.path(&format!("outputs/t/grid/images/{v}/00-1.png")))
            .unwrap()
            .to_rgb8()
            .into_raw()
    };
    let (base, lora, baked) = (img("base"), img("train"), img("baked"));
    let diff = |a: &[u8], b: &[u8]| a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    assert!(diff(&base, &lora) > 0, "the LoRA does not change the image");
    let d = diff(&lora, &baked);
    println!("LoRA row vs baked-checkpoint row: max pixel difference {d}/255");
    assert!(d <= 2, "baked checkpoint and LoRA rows differ by {d}/255");

    // extraction at the LoRA's rank recovers its update; concat-combining 0.25 + 0.75 is exact
    let (trained, _) = read_lora(&lora_path, None).unwrap();
    let (extracted, _) = read_lora(&p.path("outputs/t/extracted/lora.safetensors"), None).unwrap();
    assert!(
        extracted.text_encoder.is_empty(),
        "the text encoder did not change"
    );
    let scale = trained
        .unet
        .values()
        .map(|m| {
            m.as_lora()
                .unwrap()
                .delta(1.0)
                .data
                .iter()
                .fold(0.0f32, |a, v| a.max(v.abs()))
        })
        .fold(0.0, f32::max);
    let err = max_module_diff(&trained, &extracted);
    println!(
        "extract_lora rank 4 vs the trained rank-4 LoRA: max abs delta error {err:e} (largest delta {scale:e})"
    );
    assert!(err <= 1e-4 * scale.max(1e-3) + 1e-6, "{err}");
    let (combined, _) = read_lora(&p.path("outputs/t/combined/lora.safetensors"), None).unwrap();
    assert!(combined.unet.values().all(|m| m.rank() == 8));
    let err = max_module_diff(&trained, &combined);
    println!("combine_loras concat 0.25 + 0.75: max abs delta error {err:e}");
    assert!(err <= 1e-6, "{err}");
    let recipe: serde_json::Value = serde_json::from_str(
        &read_safetensors(&p.path("outputs/t/combined/lora.safetensors"))
            .unwrap()
            .metadata["sdpipe_merge_recipe"],
    )
    .unwrap();
    assert_eq!(recipe["mode"], "combine_loras");
    assert_eq!(recipe["inputs"].as_array().unwrap().len(), 2);

    // weighted sum and add difference of the base and the baked checkpoint
    let open = |path: std::path::PathBuf| {
        let ckpt = sdpipe::diffusion::Checkpoint::open(path)
            .unwrap()
            .with_configs_from(format!("{}/tiny-sd", fixtures()))
            .unwrap();
        sdpipe::formats::checkpoint::ModelTensors::read(&ckpt).unwrap()
    };
    let base = open(format!("{}/tiny-sd", fixtures()).into());
    let baked = open(model);
    let avg = open(p.path("outputs/t/avg/model.safetensors"));
    let diff = open(p.path("outputs/t/diff/model.safetensors"));
    let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight";
    assert_ne!(base.unet[q], baked.unet[q]);
    let mut worst = 0.0f32;
    for (name, b) in &base.unet {
        let k = &baked.unet[name];
        for (i, (x, y)) in b.data.iter().zip(&k.data).enumerate() {
            let want_avg = 0.75 * x + 0.25 * y;
            let want_diff = x + 0.5 * (y - x);
            worst = worst
                .max((avg.unet[name].data[i] - want_avg).abs())
                .max((diff.unet[name].data[i] - want_diff).abs());
        }
    }
    println!("weighted_sum / add_difference: max abs error {worst:e}");
    assert!(worst <= 1e-6, "{worst}");
    let vae_change = avg
        .vae
        .iter()
        .map(|(k, t)| t.max_abs_diff(&base.vae[k]))
        .fold(0.0, f32::max);
    assert!(
        vae_change <= 1e-6,
        "the VAE is the same on both sides: {vae_change}"
    );
}

#[test]
fn merge_errors_name_the_missing_input_and_the_foreign_module() {
    // a source that is neither a stage in `needs` nor a file
    let p = Project::new(pipeline(toml::toml! {
        [stage.baked]
        kind = "merge"
        needs = ["train"]
        mode = "lora_into_checkpoint"
        loras = ["trian"]
    }));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_ne!(run.code, 0);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(all.contains("`trian`") && all.contains("needs"), "{all}");
    println!(
        "missing input: {}",
        all.lines()
            .filter(|l| l.contains("trian"))
            .collect::<Vec<_>>()
            .join(" / ")
    );

    // a LoRA for another architecture (SD 2.x's 1024-wide cross-attention context)
    let mut t = std::collections::BTreeMap::new();
    let stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k";
    t.insert(
        format!("{stem}.lora_down.weight"),
        sdpipe::formats::HostTensor::zeros(vec![2, 1024]),
    );
    t.insert(
        format!("{stem}.lora_up.weight"),
        sdpipe::formats::HostTensor::zeros(vec![32, 2]),
    );
    t.insert(
        format!("{stem}.alpha"),
        sdpipe::formats::HostTensor::new(vec![], vec![2.0]).unwrap(),
    );
    std::fs::create_dir_all(p.path("loras")).unwrap();
    sdpipe::formats::write_safetensors(&p.path("loras/sd2.safetensors"), &t, None).unwrap();
    p.write_pipeline(pipeline(toml::toml! {
        [stage.baked]
        kind = "merge"
        mode = "lora_into_checkpoint"
        loras = ["loras/sd2.safetensors:0.5"]
    }));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_ne!(run.code, 0);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(all.contains("attn2") && all.contains("1024"), "{all}");
    println!(
        "foreign LoRA: {}",
        all.lines()
            .filter(|l| l.contains("1024"))
            .collect::<Vec<_>>()
            .join(" / ")
    );

    // parameter problems are reported at the key, with a fix
    p.write_pipeline(pipeline(toml::toml! {
        [stage.avg]
        kind = "merge"
        mode = "weighted_sum"
        models = ["base", "loras/missing.safetensors"]
        alpha = 0.5
    }));
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains("missing.safetensors") && run.stderr.contains("does not exist"),
        "{}",
        run.stderr
    );
    p.write_pipeline(pipeline(toml::toml! {
        [stage.avg]
        kind = "merge"
        mode = "weighted_sum"
        models = ["base", "base"]
    }));
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("alpha"), "{}", run.stderr);
}
