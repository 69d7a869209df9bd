//! The `train` stage with `method = "lora"` on the tiny fixture model: it lowers the loss,
//! writes a kohya file, is bit-identical on rerun and after a kill + resume, and its LoRA
//! changes the sampled image in the grid.

use crate::common::{PipelineToml, Project, killed_and_resumed};

fn pipeline() -> PipelineToml {
    PipelineToml::tiny_latents(5)
        .merge(toml::toml! {
            [stage.train]
            kind = "train"
            needs = ["latents"]
            method = "lora"
            steps = 30
            lr = 1e-3
            checkpoint_every = 10

            [stage.train.lora]
            rank = 4
            alpha = 2
        })
        .tiny_grid("grid", &["train"])
}

#[test]
fn lora_training_learns_writes_kohya_and_changes_the_grid() {
    let p = Project::new(pipeline());
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let stats = p.stats("train");
    let (before, after) = (
        stats["eval_loss_before"].as_f64().unwrap(),
        stats["eval_loss_after"].as_f64().unwrap(),
    );
    assert!(
        after < before,
        "training did not lower the evaluation loss: {before} → {after}"
    );

    let lora = p.path("outputs/t/train/lora.safetensors");
    let file = sdpipe::formats::read_safetensors(&lora).unwrap();
    assert_eq!(
        file.metadata.get("ss_network_dim").map(String::as_str),
        Some("4")
    );
    assert_eq!(
        file.metadata.get("ss_network_alpha").map(String::as_str),
        Some("2.0")
    );
    assert!(file.tensors.contains_key(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    ));
    let (network, _) = sdpipe::formats::lora::read_lora(&lora, None).unwrap();
    assert_eq!(network.unet.len(), 32);
    let params: usize = network
        .unet
        .values()
        .map(|m| m.as_lora().unwrap().down.numel() + m.as_lora().unwrap().up.numel())
        .sum();
    assert_eq!(stats["trainable_params"], params);
    let csv = std::fs::read_to_string(p.path("outputs/t/train/loss.csv")).unwrap();
    assert_eq!(csv.lines().count(), 31);

    // The grid: the base row, then the trained LoRA, which changes the image.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.path("outputs/t/grid/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["variants"], serde_json::json!(["base", "train"]));
    let base = image::open(p.path("outputs/t/grid/images/base/00-1.png"))
        .unwrap()
        .to_rgb8();
    let trained = image::open(p.path("outputs/t/grid/images/train/00-1.png"))
        .unwrap()
        .to_rgb8();
    assert_ne!(
        base.as_raw(),
        trained.as_raw(),
        "the LoRA does not change the sampled image"
    );
    let params =
        sdpipe::render::png_meta::read_parameters(p.path("outputs/t/grid/images/train/00-1.png"))
            .unwrap()
            .unwrap();
    assert!(
        params.extra.iter().any(|(k, _)| k == "Lora hashes"),
        "{:?}",
        params.extra
    );

    // `sdpipe sample --lora` (merged into the weights) draws the grid's LoRA cell (adapters).
    let lora_arg = format!("{}:1.0", lora.display());
    let merged = p.sample_tiny_cell(&["--lora", &lora_arg]);
    let diff = merged
        .as_raw()
        .iter()
        .zip(trained.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(
        diff <= 2,
        "merged and unmerged LoRA images differ by {diff}/255"
    );
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");
    let bad = p.sdpipe(&[
        "sample",
        "--model",
        model,
        "--prompt",
        "x",
        "--lora",
        "nope.safetensors",
        "--out",
        "x.png",
    ]);
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr.contains("--lora nope.safetensors"),
        "{}",
        bad.stderr
    );

    // Rerun elsewhere: bit-identical.
    let q = Project::new(pipeline());
    assert_eq!(q.sdpipe(&["run", "p.toml"]).code, 0);
    let same = std::fs::read(&lora).unwrap()
        == std::fs::read(q.path("outputs/t/train/lora.safetensors")).unwrap();
    assert!(same, "a rerun in another project gives other bytes");

    // Killed after a checkpoint, then resumed: the same file as the uninterrupted run.
    let r = killed_and_resumed(pipeline(), 60);
    assert!(r.stats("train")["resumed_from"].as_u64().unwrap() >= 10);
    let same = std::fs::read(&lora).unwrap()
        == std::fs::read(r.path("outputs/t/train/lora.safetensors")).unwrap();
    assert!(
        same,
        "the resumed run ends with other bytes than the uninterrupted one"
    );
}

#[test]
fn an_unmatched_lora_target_lists_the_modules() {
    let text = pipeline().set("stage.train.lora.targets", vec!["to_x"]);
    let p = Project::new(&text);
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stdout
            .contains("LoRA target `to_x` matches no UNet module; available: attn1.to_k"),
        "{}",
        run.stdout
    );
    let text = pipeline().set("stage.train.method", "lorax");
    let p = Project::new(&text);
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("unknown variant `lorax`"),
        "{}",
        run.stderr
    );
}

#[test]
fn text_encoder_lora_with_dropout_learns_and_writes_lora_te_modules() {
    let text = pipeline().merge(toml::toml! {
        [stage.train.lora]
        dropout = 0.1
        text_encoder = true
        text_encoder_lr = 5e-4
    });
    let p = Project::new(&text);
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let stats = p.stats("train");
    assert!(
        stats["eval_loss_after"].as_f64().unwrap() < stats["eval_loss_before"].as_f64().unwrap(),
        "{stats}"
    );
    let lora = p.path("outputs/t/train/lora.safetensors");
    let (network, _) = sdpipe::formats::lora::read_lora(&lora, None).unwrap();
    assert_eq!(network.unet.len(), 32);
    // 2 layers × q, k, v, out in the tiny text encoder
    assert_eq!(
        network.text_encoder.len(),
        8,
        "{:?}",
        network.text_encoder.keys()
    );
    let trained_up = network
        .text_encoder
        .values()
        .any(|m| m.as_lora().unwrap().up.data.iter().any(|v| *v != 0.0));
    assert!(trained_up, "the text-encoder adapters did not train");
    let file = sdpipe::formats::read_safetensors(&lora).unwrap();
    assert!(
        file.tensors
            .contains_key("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight")
    );
    assert_eq!(
        file.metadata.get("ss_text_encoder_lr").map(String::as_str),
        Some("0.0005")
    );
    // Dropout masks come from the step seeds: a rerun is bit-identical.
    let q = Project::new(&text);
    assert_eq!(q.sdpipe(&["run", "p.toml"]).code, 0);
    assert!(
        std::fs::read(&lora).unwrap()
            == std::fs::read(q.path("outputs/t/train/lora.safetensors")).unwrap()
    );
    // An unknown text-encoder target names the modules that exist.
    let bad = Project::new(text.set("stage.train.lora.text_encoder_targets", vec!["nope"]));
    let run = bad.sdpipe(&["run", "p.toml"]);
    assert_ne!(run.code, 0);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(all.contains("`nope`") && all.contains("q_proj"), "{all}");
}

/// `precision = "f16"`: LoRA trains with the UNet in mixed precision (f32 masters, loss
/// scaling), text-encoder adapters included; it lowers the loss like the f32 run does, its
/// adapters stay close to the f32 run's, and a rerun is bit-identical (cache hit).
#[test]
fn half_precision_lora_training_tracks_f32() {
    let text = pipeline().set("stage.train.lora.text_encoder", true);
    let (f32_run, half_run) = crate::common::f32_and_f16_training(&text.text(), "train", 0.1);

    // The adapters: the same modules, values near the f32 run's. Adam's normalised first
    // steps turn f16 rounding of near-zero gradients into full-size updates of `up` (which
    // starts at zero), so the values differ by ~20% while the loss tracks within 0.5%.
    let read = |p: &Project| {
        sdpipe::formats::lora::read_lora(&p.path("outputs/t/train/lora.safetensors"), None)
            .unwrap()
            .0
    };
    let (a, b) = (read(&f32_run), read(&half_run));
    assert_eq!(a.unet.len(), b.unet.len());
    assert_eq!(a.text_encoder.len(), b.text_encoder.len());
    assert!(!b.text_encoder.is_empty());
    let (mut diff, mut norm) = (0f64, 0f64);
    for ((_, _, ma), (_, _, mb)) in a.iter().zip(b.iter()) {
        for (x, y) in ma
            .as_lora()
            .unwrap()
            .up
            .data
            .iter()
            .zip(&mb.as_lora().unwrap().up.data)
        {
            diff += ((x - y) as f64).powi(2);
            norm += (*x as f64).powi(2);
        }
    }
    let rel = (diff / norm).sqrt();
    println!("f16 vs f32 trained lora_up: relative difference {rel:.3e}");
    assert!(rel < 0.35, "f16 adapters far from f32: {rel}");

    let again = half_run.sdpipe(&["run", "p.toml"]);
    assert_eq!(again.code, 0);
    assert_eq!(half_run.outcome("train"), "cached");
}

/// LoCon: naming the ResNets' `conv1` beside an attention projection trains conv adapters too
/// (kohya's `[r, in, 3, 3]` down, `[out, r, 1, 1]` up), the loss falls, and the grid renders
/// with them.
#[test]
fn conv_targets_train_locon_adapters() {
    let text = pipeline().set("stage.train.lora.targets", vec!["to_q", "conv1"]);
    let p = Project::new(&text);
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let stats = p.stats("train");
    let (before, after) = (
        stats["eval_loss_before"].as_f64().unwrap(),
        stats["eval_loss_after"].as_f64().unwrap(),
    );
    assert!(after < before, "{before} → {after}");
    let lora = p.path("outputs/t/train/lora.safetensors");
    let file = sdpipe::formats::read_safetensors(&lora).unwrap();
    let down = &file.tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"];
    let up = &file.tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"];
    assert_eq!((down.shape.len(), &down.shape[2..]), (4, &[3usize, 3][..]));
    assert_eq!((up.shape[1..]).to_vec(), vec![4, 1, 1]);
    assert!(
        up.data.iter().any(|v| *v != 0.0),
        "the conv adapter did not train"
    );
    let (network, _) = sdpipe::formats::lora::read_lora(&lora, None).unwrap();
    let convs = network.unet.values().filter(|m| m.is_conv()).count();
    assert!(convs >= 8, "{convs} conv modules");
    assert!(p.path("outputs/t/grid/grid.png").exists());
}

/// `min_snr_gamma` is a train-stage key like any other: it changes the stage's key and what it
/// learns (each sample's loss weighted by its timestep), a bad value points at the key, and
/// pipelines without it keep their keys.
#[test]
fn min_snr_gamma_weights_the_loss_and_is_validated_at_its_key() {
    // Two samples per batch: with one, a weight only rescales the gradient, which clipping to
    // `max_grad_norm` and Adam's normalisation undo.
    let plain = pipeline()
        .set("stage.train.steps", 4)
        .set("stage.train.batch_size", 2)
        .remove("stage.grid");
    let p = Project::new(&plain);
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);
    let unweighted = std::fs::read(p.path("outputs/t/train/lora.safetensors")).unwrap();

    p.write_pipeline(plain.clone().set("stage.train.min_snr_gamma", 5.0));
    let (status, reason) = p.status_of("train");
    assert_eq!(status, "stale");
    assert!(reason.contains("min_snr_gamma"), "{reason}");
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let weighted = std::fs::read(p.path("outputs/t/train/lora.safetensors")).unwrap();
    assert!(weighted != unweighted, "the weighting changed nothing");

    // 0 turns it off, as in kohya, so a matrix can sweep it on and off
    p.write_pipeline(plain.clone().set("stage.train.min_snr_gamma", 0.0));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let tensors = |bytes: &[u8]| {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("l.safetensors");
        std::fs::write(&f, bytes).unwrap();
        sdpipe::formats::read_safetensors(&f).unwrap().tensors
    };
    let off = std::fs::read(p.path("outputs/t/train/lora.safetensors")).unwrap();
    assert!(
        tensors(&off) == tensors(&unweighted),
        "min_snr_gamma = 0 weighted the loss"
    );

    p.write_pipeline(plain.set("stage.train.min_snr_gamma", -1.0));
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("min_snr_gamma") && run.stderr.contains("p.toml:"),
        "{}",
        run.stderr
    );
}

/// `optimizer` is a train-stage key: each optimiser trains the adapters to other bytes and
/// names itself in `ss_optimizer` as kohya does; writing the default out keeps the cache key;
/// an unknown optimiser, or Prodigy with a text encoder at its own rate, is refused at the key.
#[test]
fn each_optimizer_trains_names_itself_and_is_validated_at_its_key() {
    let plain = pipeline().set("stage.train.steps", 3).remove("stage.grid");
    let p = Project::new(&plain);
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);
    let file = p.path("outputs/t/train/lora.safetensors");
    let ss_optimizer = || {
        let meta = sdpipe::formats::read_safetensors(&file).unwrap().metadata;
        meta.get("ss_optimizer").cloned().unwrap_or_default()
    };
    assert_eq!(ss_optimizer(), "AdamW");
    let mut seen = vec![std::fs::read(&file).unwrap()];

    p.write_pipeline(plain.clone().set("stage.train.optimizer", "adamw"));
    assert_eq!(
        p.status_of("train").0,
        "fresh",
        "explicit adamw is the default"
    );

    for (kind, lr, class) in [
        ("adamw8bit", 1e-3, "bitsandbytes.optim.adamw.AdamW8bit("),
        ("lion", 1e-4, "lion_pytorch.lion_pytorch.Lion("),
        ("prodigy", 1.0, "prodigyopt.prodigy.Prodigy("),
        (
            "schedulefree_adamw",
            1e-3,
            "schedulefree.adamw_schedulefree.AdamWScheduleFree(",
        ),
        ("adafactor", 1e-3, "transformers.optimization.Adafactor("),
    ] {
        p.write_pipeline(
            plain
                .clone()
                .set("stage.train.optimizer", kind)
                .set("stage.train.lr", lr),
        );
        let (status, reason) = p.status_of("train");
        assert_eq!(status, "stale");
        assert!(reason.contains("optimizer"), "{kind}: {reason}");
        let run = p.sdpipe(&["run", "p.toml"]);
        assert_eq!(run.code, 0, "{kind}: {}{}", run.stdout, run.stderr);
        let trained = std::fs::read(&file).unwrap();
        assert!(!seen.contains(&trained), "`{kind}` changed nothing");
        seen.push(trained);
        assert!(
            ss_optimizer().starts_with(class),
            "{kind}: {}",
            ss_optimizer()
        );
        let loss = p.stats("train")["eval_loss_after"].as_f64().unwrap();
        assert!(loss.is_finite(), "{kind}: eval loss {loss}");
    }

    p.write_pipeline(plain.clone().set("stage.train.optimizer", "sgd"));
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("optimizer") && run.stderr.contains("p.toml:"),
        "{}",
        run.stderr
    );
    p.write_pipeline(
        plain
            .clone()
            .set("stage.train.optimizer", "schedulefree_adamw")
            .set("stage.train.lr_scheduler", "cosine"),
    );
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("lr_scheduler") && run.stderr.contains("schedule-free"),
        "{}",
        run.stderr
    );
    p.write_pipeline(
        plain
            .set("stage.train.optimizer", "prodigy")
            .set("stage.train.lr", 1.0)
            .set("stage.train.lora.text_encoder", true)
            .set("stage.train.lora.text_encoder_lr", 0.5),
    );
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("optimizer") && run.stderr.contains("text_encoder_lr"),
        "{}",
        run.stderr
    );
}

/// Prodigy (with its step-wide estimate) and schedule-free AdamW (with its `z` and the `x` it
/// saves) killed after a checkpoint and resumed end with the uninterrupted run's bytes.
#[test]
fn prodigy_and_schedulefree_resume_bit_identically() {
    for (kind, lr) in [("prodigy", 1.0), ("schedulefree_adamw", 1e-3)] {
        let pipeline = pipeline()
            .remove("stage.grid")
            .set("stage.train.optimizer", kind)
            .set("stage.train.lr", lr);
        let q = Project::new(&pipeline);
        let run = q.sdpipe(&["run", "p.toml"]);
        assert_eq!(run.code, 0, "{kind}: {}{}", run.stdout, run.stderr);
        let straight = std::fs::read(q.path("outputs/t/train/lora.safetensors")).unwrap();

        let r = killed_and_resumed(&pipeline, 60);
        assert!(r.stats("train")["resumed_from"].as_u64().unwrap() >= 10);
        let resumed = std::fs::read(r.path("outputs/t/train/lora.safetensors")).unwrap();
        assert!(
            resumed == straight,
            "{kind}: the resumed run ends with other bytes than the uninterrupted one"
        );
    }
}

/// kohya's noise options are train-stage keys: `noise_offset` and pyramid noise each change the
/// key and what is learned; a key that needs another names it.
#[test]
fn noise_offset_and_pyramid_noise_change_the_training_noise() {
    let plain = pipeline().set("stage.train.steps", 3).remove("stage.grid");
    let p = Project::new(&plain);
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);
    let lora = || std::fs::read(p.path("outputs/t/train/lora.safetensors")).unwrap();
    let base = lora();
    let mut seen = vec![base];
    for (key, value) in [
        ("noise_offset", toml::Value::from(0.1)),
        ("multires_noise_iterations", toml::Value::from(6)),
    ] {
        p.write_pipeline(plain.clone().set(&format!("stage.train.{key}"), value));
        assert!(p.status_of("train").1.contains(key));
        let run = p.sdpipe(&["run", "p.toml"]);
        assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
        let trained = lora();
        assert!(!seen.contains(&trained), "`{key}` changed nothing");
        seen.push(trained);
    }
    for (key, value, needs) in [
        ("adaptive_noise_scale", 0.01, "noise_offset"),
        ("multires_noise_discount", 0.5, "multires_noise_iterations"),
    ] {
        p.write_pipeline(plain.clone().set(&format!("stage.train.{key}"), value));
        let run = p.sdpipe(&["plan", "p.toml"]);
        assert_eq!(run.code, 2);
        assert!(
            run.stderr.contains(key) && run.stderr.contains(needs),
            "{}",
            run.stderr
        );
    }
}

/// Timestep sampling is a train-stage key: a bias or the logit-normal draw changes what is
/// learned; keys that only mean something beside another say so at their line.
#[test]
fn timestep_sampling_options_change_the_draw_and_refuse_conflicts() {
    let plain = pipeline().set("stage.train.steps", 3).remove("stage.grid");
    let p = Project::new(&plain);
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);
    let lora = || std::fs::read(p.path("outputs/t/train/lora.safetensors")).unwrap();
    let mut seen = vec![lora()];
    for edited in [
        plain.clone().set("stage.train.timestep_bias", "high"),
        plain
            .clone()
            .set("stage.train.timestep_sampling", "logit_normal"),
    ] {
        p.write_pipeline(&edited);
        let run = p.sdpipe(&["run", "p.toml"]);
        assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
        let trained = lora();
        assert!(!seen.contains(&trained), "changed nothing:\n{edited}");
        seen.push(trained);
    }
    for (edited, key) in [
        (
            plain
                .clone()
                .set("stage.train.timestep_sampling", "logit_normal")
                .set("stage.train.timestep_bias", "low"),
            "timestep_bias",
        ),
        (plain.clone().set("stage.train.logit_std", 0.5), "logit_std"),
        (
            plain.clone().set("stage.train.timestep_bias_portion", 0.5),
            "timestep_bias_portion",
        ),
    ] {
        p.write_pipeline(&edited);
        let run = p.sdpipe(&["plan", "p.toml"]);
        assert_eq!(run.code, 2, "{edited}");
        assert!(run.stderr.contains(key), "{}", run.stderr);
    }
}

/// `prediction_type` and `zero_terminal_snr` are train-stage keys: the variant learns to predict
/// v on the rescaled schedule, ships the scheduler config it must be sampled with, and the
/// grid samples its row with it, as `sample --scheduler-config` does. ε-prediction with zero
/// terminal SNR is refused with why, at the key or, for a base model's own ε, at the run.
#[test]
fn v_prediction_with_zero_terminal_snr_trains_and_samples_with_its_schedule() {
    let plain = pipeline().set("stage.train.steps", 3);
    let p = Project::new(&plain);
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);
    let config = p.path("outputs/t/train/scheduler_config.json");
    assert!(!config.exists(), "a plain run needs no scheduler config");
    let eps = std::fs::read(p.path("outputs/t/train/lora.safetensors")).unwrap();

    let v = plain
        .clone()
        .set("stage.train.prediction_type", "v_prediction")
        .set("stage.train.zero_terminal_snr", true);
    p.write_pipeline(&v);
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_ne!(
        std::fs::read(p.path("outputs/t/train/lora.safetensors")).unwrap(),
        eps
    );
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    assert_eq!(written["prediction_type"], "v_prediction");
    assert_eq!(written["rescale_betas_zero_snr"], true);
    assert_eq!(written["timestep_spacing"], "trailing");
    let meta = sdpipe::formats::read_safetensors(&p.path("outputs/t/train/lora.safetensors"))
        .unwrap()
        .metadata;
    assert_eq!(meta["ss_zero_terminal_snr"], "True");
    assert_eq!(meta["modelspec.prediction_type"], "v");

    // The grid's row of the variant is what `sample` draws with the written config.
    let cell = image::open(p.path("outputs/t/grid/images/train/00-1.png"))
        .unwrap()
        .to_rgb8();
    let lora = p.path("outputs/t/train/lora.safetensors");
    let sample = |extra: &[&str]| {
        let mut args = vec!["--lora", lora.to_str().unwrap()];
        args.extend_from_slice(extra);
        let img = p.sample_tiny_cell(&args);
        img.as_raw()
            .iter()
            .zip(cell.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap()
    };
    let with_config = sample(&["--scheduler-config", config.to_str().unwrap()]);
    assert!(
        with_config <= 2,
        "differs from the grid by {with_config}/255"
    );
    let without = sample(&[]);
    assert!(without > 2, "the scheduler config changed nothing");

    // Explicit ε with zero terminal SNR: refused at the key.
    p.write_pipeline(v.clone().set("stage.train.prediction_type", "epsilon"));
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("zero_terminal_snr") && run.stderr.contains("p.toml:"),
        "{}",
        run.stderr
    );
    // The base model's own ε: refused when the run loads it, saying what to set.
    p.write_pipeline(v.remove("stage.train.prediction_type"));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_ne!(run.code, 0);
    let said = format!("{}{}", run.stdout, run.stderr);
    assert!(
        said.contains("prediction_type = \"v_prediction\""),
        "{said}"
    );
}

/// Caption shaping is a set of train-stage keys: shuffled tags keep the leading ones, dropped
/// captions train as empty, the run records every caption it trained with, and a rerun
/// elsewhere is bit-identical. The frozen-encoder (LoRA, hypernetwork) and token-id (textual
/// inversion) paths all take shaped captions; a key that needs another names it.
#[test]
fn caption_shuffle_and_dropout_are_seeded_recorded_and_validated() {
    let plain = pipeline()
        .set(
            "stage.caption.template",
            "{token}, red, heart, shiny, centered",
        )
        .set("stage.train.steps", 6)
        .set("stage.train.batch_size", 2)
        .remove("stage.grid");
    let p = Project::new(&plain);
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);
    let lora = || std::fs::read(p.path("outputs/t/train/lora.safetensors")).unwrap();
    let captions_csv = p.path("outputs/t/train/captions.csv");
    assert!(!captions_csv.exists(), "nothing to record without shaping");
    let mut seen = vec![lora()];

    let shuffled = plain
        .clone()
        .set("stage.train.shuffle_caption", true)
        .set("stage.train.keep_tokens", 1)
        .set("stage.train.caption_dropout", 0.3);
    p.write_pipeline(&shuffled);
    assert!(p.status_of("train").1.contains("shuffle_caption"));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(!seen.contains(&lora()), "shaping changed nothing");
    seen.push(lora());
    let csv = std::fs::read_to_string(&captions_csv).unwrap();
    let captions: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.splitn(4, ',').nth(3).unwrap().trim_matches('"'))
        .collect();
    assert_eq!(captions.len(), 12, "6 steps × 2 items:\n{csv}");
    let empty = captions.iter().filter(|c| c.is_empty()).count();
    assert!(empty > 0 && empty < 12, "{empty} of 12 dropped:\n{csv}");
    let kept: std::collections::HashSet<&str> =
        captions.iter().copied().filter(|c| !c.is_empty()).collect();
    // The template's tags keep their leading one (some images have captions of their own).
    let tagged: Vec<&&str> = kept.iter().filter(|c| c.contains("shiny")).collect();
    assert!(tagged.iter().all(|c| c.starts_with("zorb, ")), "{csv}");
    assert!(tagged.len() > 1, "every caption in the same order:\n{csv}");

    // Elsewhere, the same captions and the same file.
    let q = Project::new(&shuffled);
    assert_eq!(q.sdpipe(&["run", "p.toml"]).code, 0);
    assert_eq!(
        std::fs::read_to_string(q.path("outputs/t/train/captions.csv")).unwrap(),
        csv
    );
    assert_eq!(
        std::fs::read(q.path("outputs/t/train/lora.safetensors")).unwrap(),
        seen[1]
    );

    // The other text paths take shaped captions too.
    for (method, file) in [
        ("hypernetwork", "hypernetwork.pt"),
        ("textual_inversion", "embedding.safetensors"),
    ] {
        let edited = shuffled
            .clone()
            .set("stage.train.method", method)
            .set("stage.train.textual_inversion.token", "zorb");
        p.write_pipeline(&edited);
        let run = p.sdpipe(&["run", "p.toml"]);
        assert_eq!(run.code, 0, "{method}: {}{}", run.stdout, run.stderr);
        assert!(p.path(&format!("outputs/t/train/{file}")).exists());
        assert!(captions_csv.exists(), "{method}");
    }

    for (edited, key) in [
        (
            plain.clone().set("stage.train.keep_tokens", 1),
            "keep_tokens",
        ),
        (
            plain.clone().set("stage.train.caption_dropout", 1.0),
            "caption_dropout",
        ),
    ] {
        p.write_pipeline(&edited);
        let run = p.sdpipe(&["plan", "p.toml"]);
        assert_eq!(run.code, 2, "{edited}");
        assert!(run.stderr.contains(key), "{}", run.stderr);
    }
}

/// `save_every` keeps the artifact of intermediate steps: each is exactly what a shorter run
/// ends with, the grid samples each as a row `NAME#step=N`, and a killed and resumed run saves
/// the same files. Every method saves its own kind of artifact.
#[test]
fn save_every_keeps_intermediate_artifacts_as_grid_rows() {
    let saving = pipeline().set("stage.train.save_every", 10);
    let p = Project::new(&saving);
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let at10 = p.path("outputs/t/train/step=10/lora.safetensors");
    assert!(p.path("outputs/t/train/step=20/lora.safetensors").exists());
    assert!(
        !p.path("outputs/t/train/step=30").exists(),
        "the last step is the artifact"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.path("outputs/t/grid/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(
        manifest["variants"],
        serde_json::json!(["base", "train#step=10", "train#step=20", "train"])
    );
    // Row folders are percent-encoded variant names (`#` → `%23`).
    let row = |v: &str| {
        image::open(p.path(&format!("outputs/t/grid/images/{v}/00-1.png")))
            .unwrap()
            .to_rgb8()
            .into_raw()
    };
    assert_ne!(row("train%23step=10"), row("train"));

    // The step-10 artifact holds what a 10-step run ends with; with schedule-free AdamW that
    // is its evaluation point x, not the training point y the run goes on from.
    let same_adapters = |a: &std::path::Path, b: &std::path::Path| {
        let (a, _) = sdpipe::formats::lora::read_lora(a, None).unwrap();
        let (b, _) = sdpipe::formats::lora::read_lora(b, None).unwrap();
        assert_eq!(a.unet.len(), b.unet.len());
        for (name, m) in &a.unet {
            assert_eq!(
                m.as_lora().unwrap().up.data,
                b.unet[name].as_lora().unwrap().up.data,
                "{name}"
            );
            assert_eq!(
                m.as_lora().unwrap().down.data,
                b.unet[name].as_lora().unwrap().down.data,
                "{name}"
            );
        }
    };
    let short = Project::new(pipeline().set("stage.train.steps", 10).remove("stage.grid"));
    assert_eq!(short.sdpipe(&["run", "p.toml"]).code, 0);
    same_adapters(&at10, &short.path("outputs/t/train/lora.safetensors"));
    let meta = sdpipe::formats::read_safetensors(&at10).unwrap().metadata;
    assert_eq!(meta["ss_steps"], "10");
    let free = |p: PipelineToml| p.set("stage.train.optimizer", "schedulefree_adamw");
    let sf = Project::new(free(saving.clone()).remove("stage.grid"));
    assert_eq!(sf.sdpipe(&["run", "p.toml"]).code, 0);
    let sf_short = Project::new(free(
        pipeline().set("stage.train.steps", 10).remove("stage.grid"),
    ));
    assert_eq!(sf_short.sdpipe(&["run", "p.toml"]).code, 0);
    same_adapters(
        &sf.path("outputs/t/train/step=10/lora.safetensors"),
        &sf_short.path("outputs/t/train/lora.safetensors"),
    );

    // Killed after a checkpoint and resumed: the same snapshots.
    let r = killed_and_resumed(&saving, 60);
    for step in [10, 20] {
        let file = format!("outputs/t/train/step={step}/lora.safetensors");
        assert_eq!(
            std::fs::read(r.path(&file)).unwrap(),
            std::fs::read(p.path(&file)).unwrap(),
            "{file}"
        );
    }

    // The other methods save theirs, and the grid samples them.
    for (method, file) in [
        ("textual_inversion", "embedding.safetensors"),
        ("hypernetwork", "hypernetwork.pt"),
        ("dreambooth", "model.safetensors"),
    ] {
        let other = saving
            .clone()
            .set("stage.train.method", method)
            .set("stage.train.steps", 4)
            .set("stage.train.save_every", 2)
            .set("stage.train.textual_inversion.token", "zorb");
        p.write_pipeline(&other);
        let run = p.sdpipe(&["run", "p.toml"]);
        assert_eq!(run.code, 0, "{method}: {}{}", run.stdout, run.stderr);
        assert!(
            p.path(&format!("outputs/t/train/step=2/{file}")).exists(),
            "{method}"
        );
        assert!(
            p.path("outputs/t/grid/images/train%23step=2/00-1.png")
                .exists(),
            "{method}"
        );
    }

    p.write_pipeline(saving.set("stage.train.save_every", 30));
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("save_every"), "{}", run.stderr);
}

/// `ema_decay` keeps diffusers' EMA of the trained weights: its artifact is the average of
/// every step's weights by diffusers' decay schedule (checked against the per-step artifacts
/// `save_every = 1` keeps), the grid samples it as the row `NAME#ema`, a killed and resumed run
/// writes the same file, and every method writes its own.
#[test]
fn ema_of_the_weights_is_written_sampled_and_resumable() {
    let decay = 0.9f64;
    let steps = 12u64;
    let with_ema = pipeline()
        .set("stage.train.steps", steps as i64)
        .set("stage.train.checkpoint_every", 4)
        .set("stage.train.ema_decay", decay);
    let p = Project::new(with_ema.clone().set("stage.train.save_every", 1));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let ema_file = p.path("outputs/t/train/ema/lora.safetensors");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.path("outputs/t/grid/manifest.json")).unwrap())
            .unwrap();
    let variants = manifest["variants"].as_array().unwrap();
    assert_eq!(variants.last().unwrap(), "train#ema", "{variants:?}");

    // The average by hand: s₁ = w₁, then s −= (1 − d(t))·(s − w_t), d(t) = min(decay, t/(9 + t)).
    let read = |path: std::path::PathBuf| sdpipe::formats::lora::read_lora(&path, None).unwrap().0;
    let weights: Vec<_> = (1..=steps)
        .map(|t| {
            read(if t == steps {
                p.path("outputs/t/train/lora.safetensors")
            } else {
                p.path(&format!("outputs/t/train/step={t}/lora.safetensors"))
            })
        })
        .collect();
    let mut avg = weights[0].clone();
    for (i, w) in weights.iter().enumerate().skip(1) {
        let k = i as f64; // t − 1
        let one_minus = (1.0 - ((1.0 + k) / (10.0 + k)).min(decay)) as f32;
        for (name, m) in avg.unet.iter_mut() {
            for (s, &x) in m
                .as_lora_mut()
                .unwrap()
                .up
                .data
                .iter_mut()
                .zip(&w.unet[name].as_lora().unwrap().up.data)
            {
                *s -= one_minus * (*s - x);
            }
            for (s, &x) in m
                .as_lora_mut()
                .unwrap()
                .down
                .data
                .iter_mut()
                .zip(&w.unet[name].as_lora().unwrap().down.data)
            {
                *s -= one_minus * (*s - x);
            }
        }
    }
    let ema = read(ema_file.clone());
    for (name, m) in &ema.unet {
        assert_eq!(
            m.as_lora().unwrap().up.data,
            avg.unet[name].as_lora().unwrap().up.data,
            "{name}"
        );
        assert_eq!(
            m.as_lora().unwrap().down.data,
            avg.unet[name].as_lora().unwrap().down.data,
            "{name}"
        );
    }
    assert_ne!(
        ema.unet, weights[11].unet,
        "the average is not the last weights"
    );

    // Killed after a checkpoint and resumed: the same average.
    let r = killed_and_resumed(with_ema.clone().remove("stage.grid"), 80);
    assert!(r.stats("train")["resumed_from"].as_u64().unwrap() >= 4);
    assert_eq!(
        std::fs::read(r.path("outputs/t/train/ema/lora.safetensors")).unwrap(),
        std::fs::read(&ema_file).unwrap()
    );

    for (method, file) in [
        ("textual_inversion", "embedding.safetensors"),
        ("hypernetwork", "hypernetwork.pt"),
        ("dreambooth", "model.safetensors"),
    ] {
        let other = with_ema
            .clone()
            .set("stage.train.method", method)
            .set("stage.train.steps", 3)
            .set("stage.train.textual_inversion.token", "zorb");
        p.write_pipeline(&other);
        let run = p.sdpipe(&["run", "p.toml"]);
        assert_eq!(run.code, 0, "{method}: {}{}", run.stdout, run.stderr);
        assert!(
            p.path(&format!("outputs/t/train/ema/{file}")).exists(),
            "{method}"
        );
        assert!(
            p.path("outputs/t/grid/images/train%23ema/00-1.png")
                .exists(),
            "{method}"
        );
    }

    for (edited, key) in [
        (
            with_ema.clone().set("stage.train.ema_decay", 1.0),
            "ema_decay",
        ),
        (
            with_ema
                .clone()
                .set("stage.train.optimizer", "schedulefree_adamw"),
            "ema_decay",
        ),
        (pipeline().set("stage.train.ema_warmup", true), "ema_warmup"),
    ] {
        p.write_pipeline(&edited);
        let run = p.sdpipe(&["plan", "p.toml"]);
        assert_eq!(run.code, 2, "{edited}");
        assert!(run.stderr.contains(key), "{}", run.stderr);
    }
}

/// `validation_split` holds images out of training and `validate_every` logs their loss (fixed
/// latents, noise and timesteps) before training and every N steps into `validation.csv`; a
/// killed and resumed run logs the same values; the keys that need each other say so.
#[test]
fn validation_loss_on_held_out_images_is_logged_and_resumable() {
    let validating = pipeline()
        .set("stage.train.validation_split", 0.25)
        .set("stage.train.validate_every", 10)
        .remove("stage.grid");
    let p = Project::new(&validating);
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let csv = std::fs::read_to_string(p.path("outputs/t/train/validation.csv")).unwrap();
    let rows: Vec<(u64, f32)> = csv
        .lines()
        .skip(1)
        .map(|l| {
            let (s, v) = l.split_once(',').unwrap();
            (s.parse().unwrap(), v.parse().unwrap())
        })
        .collect();
    assert_eq!(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![0, 10, 20, 30],
        "{csv}"
    );
    assert!(rows.iter().all(|r| r.1.is_finite() && r.1 > 0.0), "{csv}");
    assert_ne!(rows[0].1, rows[3].1, "training changed nothing held out");
    let stats = p.stats("train");
    assert_eq!(
        stats["validation_loss_after"].as_f64().unwrap() as f32,
        rows[3].1
    );

    let r = killed_and_resumed(&validating, 60);
    assert_eq!(
        std::fs::read_to_string(r.path("outputs/t/train/validation.csv")).unwrap(),
        csv
    );

    for (edited, key) in [
        (
            pipeline().set("stage.train.validate_every", 10),
            "validate_every",
        ),
        (
            pipeline().set("stage.train.validation_split", 1.0),
            "validation_split",
        ),
    ] {
        p.write_pipeline(&edited);
        let run = p.sdpipe(&["plan", "p.toml"]);
        assert_eq!(run.code, 2, "{edited}");
        assert!(run.stderr.contains(key), "{}", run.stderr);
    }
}

/// An `encode_text` stage encodes the captions once for every train stage that needs it: the
/// trained files are bit for bit those of stages that encode their captions themselves, and a
/// clip skip that differs from the train stage's is refused naming both.
#[test]
fn an_encode_text_stage_shares_the_captions_states_bit_for_bit() {
    let own = pipeline().set("stage.train.steps", 3).remove("stage.grid");
    let p = Project::new(&own);
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);
    let encoded_here = std::fs::read(p.path("outputs/t/train/lora.safetensors")).unwrap();

    let shared = own
        .clone()
        .stage("text", "encode_text", &["latents"])
        .set("stage.train.needs", vec!["latents", "text"]);
    let q = Project::new(&shared);
    let run = q.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(q.path("outputs/t/text/text_states.safetensors").exists());
    assert_eq!(
        std::fs::read(q.path("outputs/t/train/lora.safetensors")).unwrap(),
        encoded_here
    );

    q.write_pipeline(shared.set("stage.text.clip_skip", 1));
    let run = q.sdpipe(&["run", "p.toml"]);
    assert_ne!(run.code, 0);
    let said = format!("{}{}", run.stdout, run.stderr);
    assert!(
        said.contains("clip_skip = 1") && said.contains("clip_skip = 0"),
        "{said}"
    );
}
