//! The `train` stage with `method = "hypernetwork"` on the tiny fixture model: it lowers the
//! loss, writes an A1111 `.pt` (and safetensors twin) that reads back, is bit-identical on
//! rerun and after a kill + resume, changes the grid and `sdpipe sample --hypernetwork`
//! (multiplier 0 = the base image), and a width the model lacks is a clear error.

use crate::common::{PipelineToml, Project, killed_and_resumed};

/// A hypernetwork stage `hyper` with `hypernetwork` as its `[stage.hyper.hypernetwork]` table,
/// and a grid that samples it (and applies it at 0.5 through a prompt tag).
fn pipeline(hypernetwork: toml::Table) -> PipelineToml {
    PipelineToml::tiny_latents(4)
        .merge(toml::toml! {
            [stage.hyper]
            kind = "train"
            needs = ["latents"]
            method = "hypernetwork"
            steps = 30
            lr = 3e-3
            checkpoint_every = 10
        })
        .tiny_grid("grid", &["hyper"])
        .set(
            "stage.grid.prompts",
            vec!["a photo of zorb", "a photo of zorb <hypernet:hyper:0.5>"],
        )
        .set("stage.hyper.hypernetwork", toml::Value::Table(hypernetwork))
}

/// Self-attention at level 0 (width 32 = the text width here) and the mid block (64), with
/// relu, layer norm and dropout: every part of the MLP trains.
fn hyper() -> toml::Table {
    toml::toml! {
        sizes = [32, 64]
        layer_structure = [1, 2, 1]
        activation = "relu"
        layer_norm = true
        dropout_structure = [0, 0.1, 0]
    }
}

fn read_rgb(path: &std::path::Path) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

fn sample(p: &Project, out: &str, hypers: &[&str]) -> (i32, String) {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");
    let out = p.path(out);
    let mut args = vec![
        "sample",
        "--model",
        model,
        "--prompt",
        "a photo of zorb",
        "--steps",
        "4",
        "--sampler",
        "ddim",
        "--seed",
        "1",
        "--width",
        "16",
        "--height",
        "16",
        "--out",
        out.to_str().unwrap(),
    ];
    for h in hypers {
        args.extend(["--hypernetwork", h]);
    }
    let run = p.sdpipe(&args);
    (run.code, run.stderr)
}

#[test]
fn hypernetwork_training_learns_writes_a1111_files_and_changes_samples() {
    let p = Project::new(pipeline(hyper()));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let stats = p.stats("hyper");
    let (before, after) = (
        stats["eval_loss_before"].as_f64().unwrap(),
        stats["eval_loss_after"].as_f64().unwrap(),
    );
    println!("eval loss {before} → {after}");
    assert!(
        after < before,
        "training did not lower the evaluation loss: {before} → {after}"
    );

    // The .pt and its twin read back with the same modules, settings and name.
    let pt = p.path("outputs/t/hyper/hypernetwork.pt");
    let twin = p.path("outputs/t/hyper/hypernetwork.safetensors");
    let a = sdpipe::formats::hypernetwork::read_hypernetwork(&pt).unwrap();
    let b = sdpipe::formats::hypernetwork::read_hypernetwork(&twin).unwrap();
    assert_eq!(a.modules, b.modules);
    assert_eq!(a.name, "hyper");
    assert_eq!(a.step, 30);
    assert_eq!(a.config.activation_func.as_deref(), Some("relu"));
    assert!(a.config.is_layer_norm);
    assert_eq!(a.config.effective_dropout_structure(), vec![0.0, 0.1, 0.0]);
    assert_eq!(a.modules.keys().copied().collect::<Vec<_>>(), vec![32, 64]);
    let (k32, _) = &a.modules[&32];
    assert_eq!(k32.layers[0].weight.shape, vec![64, 32]);
    assert!(k32.layers[0].layer_norm.is_some());
    let params: usize = a
        .modules
        .values()
        .flat_map(|(k, v)| [k, v])
        .flat_map(|m| &m.layers)
        .map(|l| {
            l.weight.numel()
                + l.bias.numel()
                + l.layer_norm
                    .as_ref()
                    .map_or(0, |(w, b)| w.numel() + b.numel())
        })
        .sum();
    assert_eq!(stats["trainable_params"], params);
    // trained: every module's biases moved away from zero (each width's k and v context
    // feeds the loss: cross-attention and self-attention at 32, the mid block at 64)
    for (width, (k, v)) in &a.modules {
        for (which, m) in [("k", k), ("v", v)] {
            assert!(
                m.layers
                    .iter()
                    .all(|l| l.bias.data.iter().any(|x| x.abs() > 1e-4)),
                "{width}.{which} did not train"
            );
        }
    }
    let csv = std::fs::read_to_string(p.path("outputs/t/hyper/loss.csv")).unwrap();
    assert_eq!(csv.lines().count(), 31);

    // The grid: base, then the hypernetwork row; the tagged prompt applies it at 0.5 to the
    // base row too.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.path("outputs/t/grid/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["variants"], serde_json::json!(["base", "hyper"]));
    let base = read_rgb(&p.path("outputs/t/grid/images/base/00-1.png"));
    let trained = read_rgb(&p.path("outputs/t/grid/images/hyper/00-1.png"));
    let tagged = read_rgb(&p.path("outputs/t/grid/images/base/01-1.png"));
    assert_ne!(
        base.as_raw(),
        trained.as_raw(),
        "the hypernetwork does not change the image"
    );
    assert_ne!(
        base.as_raw(),
        tagged.as_raw(),
        "<hypernet:hyper:0.5> does nothing"
    );
    assert_ne!(
        trained.as_raw(),
        tagged.as_raw(),
        "the multiplier is ignored"
    );

    // `sdpipe sample --hypernetwork` draws the grid's cell; multiplier 0 is the base image.
    let arg = format!("{}:1.0", pt.display());
    let (code, err) = sample(&p, "direct.png", &[&arg]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(read_rgb(&p.path("direct.png")).as_raw(), trained.as_raw());
    let arg = format!("{}:0.5", twin.display());
    let (code, err) = sample(&p, "half.png", &[&arg]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(read_rgb(&p.path("half.png")).as_raw(), tagged.as_raw());
    let arg = format!("{}:0", pt.display());
    let (code, err) = sample(&p, "zero.png", &[&arg]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(read_rgb(&p.path("zero.png")).as_raw(), base.as_raw());
    // Stacked, in order: the hyper row with the tagged prompt is the network at 1 then at 0.5.
    let stacked = read_rgb(&p.path("outputs/t/grid/images/hyper/01-1.png"));
    assert_ne!(stacked.as_raw(), trained.as_raw());
    assert_ne!(stacked.as_raw(), tagged.as_raw());
    let (one, half) = (
        format!("{}:1", pt.display()),
        format!("{}:0.5", pt.display()),
    );
    let (code, err) = sample(&p, "stacked.png", &[&one, &half]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(read_rgb(&p.path("stacked.png")).as_raw(), stacked.as_raw());
    let params = sdpipe::render::png_meta::read_parameters(p.path("direct.png"))
        .unwrap()
        .unwrap();
    assert!(
        params.extra.iter().any(|(k, _)| k == "Hypernet hashes"),
        "{:?}",
        params.extra
    );

    // Rerun elsewhere: bit-identical (dropout included).
    let q = Project::new(pipeline(hyper()));
    assert_eq!(q.sdpipe(&["run", "p.toml"]).code, 0);
    assert!(
        std::fs::read(&pt).unwrap()
            == std::fs::read(q.path("outputs/t/hyper/hypernetwork.pt")).unwrap(),
        "a rerun in another project gives other bytes"
    );

    // Killed after a checkpoint, then resumed: the same file as the uninterrupted run.
    let r = killed_and_resumed(pipeline(hyper()), 80);
    assert!(r.stats("hyper")["resumed_from"].as_u64().unwrap() >= 10);
    assert!(
        std::fs::read(&pt).unwrap()
            == std::fs::read(r.path("outputs/t/hyper/hypernetwork.pt")).unwrap(),
        "the resumed run ends with other bytes than the uninterrupted one"
    );
}

#[test]
fn a_width_the_model_lacks_is_a_clear_error() {
    let p = Project::new(pipeline(toml::toml! { sizes = [768] }));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stdout
            .contains("no attention with context width 768; its widths are [32, 64]"),
        "{}",
        run.stdout
    );

    let p = Project::new(pipeline(toml::toml! { activation = "wiggle" }));
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("activation `wiggle`"), "{}", run.stderr);

    // A file with a width the model lacks, given to `sample`.
    let config = sdpipe::formats::hypernetwork::HypernetworkConfig::default();
    let hn = sdpipe::formats::hypernetwork::Hypernetwork::new("wide", config, &[768], 1).unwrap();
    let file = p.path("wide.pt");
    sdpipe::formats::hypernetwork::write_hypernetwork_pt(&file, &hn).unwrap();
    let (code, err) = sample(&p, "x.png", &[file.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--hypernetwork")
            && err.contains("context width 768")
            && err.contains("[32, 64]"),
        "{err}"
    );
}

#[test]
fn lora_tags_in_grid_prompts_apply_the_upstream_lora() {
    let text = PipelineToml::tiny_latents(4)
        .merge(toml::toml! {
            [stage.style]
            kind = "train"
            needs = ["latents"]
            method = "lora"
            steps = 8
            lr = 1e-2
        })
        .tiny_grid("grid", &["style"])
        .set(
            "stage.grid.prompts",
            vec!["a photo of zorb", "a photo of <lora:style:0.5> zorb"],
        );
    let p = Project::new(&text);
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let base = read_rgb(&p.path("outputs/t/grid/images/base/00-1.png"));
    let tagged = read_rgb(&p.path("outputs/t/grid/images/base/01-1.png"));
    assert_ne!(
        base.as_raw(),
        tagged.as_raw(),
        "<lora:style:0.5> does nothing"
    );
    // the tag merges the LoRA at 0.5 into the weights, as `sample --lora FILE:0.5` does
    let lora = p.path("outputs/t/style/lora.safetensors");
    let arg = format!("{}:0.5", lora.display());
    assert_eq!(
        p.sample_tiny_cell(&["--lora", &arg]).as_raw(),
        tagged.as_raw()
    );
    let params =
        sdpipe::render::png_meta::read_parameters(p.path("outputs/t/grid/images/base/01-1.png"))
            .unwrap()
            .unwrap();
    assert_eq!(params.prompt, "a photo of <lora:style:0.5> zorb");
    assert!(params.extra.iter().any(|(k, _)| k == "Lora hashes"));

    // A tag naming no upstream network is an error that lists the ones there are.
    p.write_pipeline(text.clone().set(
        "stage.grid.prompts",
        vec!["a photo of zorb", "a photo of <hypernet:style> zorb"],
    ));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stdout
            .contains("`style` is not an upstream stage with a hypernetwork.pt"),
        "{}",
        run.stdout
    );
    p.write_pipeline(text.set(
        "stage.grid.prompts",
        vec!["a photo of zorb", "a photo of <lora::0.5> zorb"],
    ));
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("names no network"), "{}", run.stderr);
}

/// `precision = "f16"`: the hypernetwork trains hooked into a mixed-precision UNet (f16
/// working copies of its f32 master weights, loss scaling); the loss falls like the f32 run's.
#[test]
fn half_precision_hypernetwork_tracks_f32() {
    crate::common::f32_and_f16_training(&pipeline(hyper()).text(), "hyper", 0.05);
}
