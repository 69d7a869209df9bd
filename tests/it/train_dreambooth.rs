//! The `train` stage with `method = "dreambooth"` (full UNet fine-tuning) and the
//! `class_images` stage (prior preservation) on the tiny fixture model: it lowers the loss,
//! writes a single-file checkpoint that opens as a model and changes the sampled image, reruns
//! bit-identically and resumes after a kill to the same bytes; class images are cached one by
//! one.

use crate::common::{PipelineToml, Project, killed_and_resumed};

fn pipeline(class_count: i64) -> PipelineToml {
    PipelineToml::tiny_latents(5)
        .set("stage.caption.template", "a photo of {token} shape")
        .merge(toml::toml! {
            [stage.class]
            kind = "class_images"
            prompt = "a photo of a shape"
            steps = 3
            width = 16
            height = 16

            [stage.train]
            kind = "train"
            needs = ["latents", "class"]
            method = "dreambooth"
            steps = 12
            lr = 2e-4
            checkpoint_every = 4

            [stage.train.dreambooth]
            prior_loss_weight = 0.5
            save_dtype = "f32"
        })
        .set("stage.class.count", class_count)
}

/// [`pipeline`] with the text encoder trained too, at its own rate.
fn with_text_encoder(class_count: i64) -> PipelineToml {
    pipeline(class_count).merge(toml::toml! {
        [stage.train.dreambooth]
        train_text_encoder = true
        text_encoder_lr = 1e-4
    })
}

#[test]
fn dreambooth_learns_writes_a_loadable_checkpoint_and_resumes_identically() {
    let p = Project::new(pipeline(3));
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

    // Class images: 3 PNGs and a manifest of latents, the class prompt as caption.
    let class: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.path("outputs/t/class/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(class["items"].as_array().unwrap().len(), 3);
    assert_eq!(class["items"][0]["caption"], "a photo of a shape");
    assert!(p.path("outputs/t/class/images/class-0002.png").exists());

    // The checkpoint opens as an original-layout model with every UNet tensor trained and the
    // VAE and text encoder as in the base.
    let model = p.path("outputs/t/train/model.safetensors");
    let file = sdpipe::formats::read_safetensors(&model).unwrap();
    assert!(file.metadata["sdpipe_train_recipe"].contains("\"dreambooth\""));
    let base = sdpipe::diffusion::Checkpoint::open(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tiny-sd"
    ))
    .unwrap();
    let tuned = sdpipe::diffusion::Checkpoint::open(&model)
        .unwrap()
        .with_configs_from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-sd"
        ))
        .unwrap();
    let (b, t) = (base.unet_weights(), tuned.unet_weights());
    assert_eq!(b.len(), t.len());
    let mut changed = 0;
    for name in b.names() {
        let (bv, _) = b.read(name).unwrap();
        let (tv, _) = t.read(name).unwrap();
        changed += usize::from(bv != tv);
    }
    assert!(
        changed * 10 >= b.len() * 9,
        "only {changed} of {} UNet tensors changed",
        b.len()
    );
    for name in base.vae_weights().names() {
        assert_eq!(
            base.vae_weights().read(name).unwrap().0,
            tuned.vae_weights().read(name).unwrap().0,
            "VAE tensor {name} changed"
        );
    }
    assert_eq!(stats["trainable_params"], {
        let n: usize = b
            .names()
            .map(|n| b.shape(n).unwrap().iter().product::<usize>())
            .sum();
        n
    });

    // `sdpipe sample --model` on the checkpoint differs from the base model.
    let sample = |model: &str, out: &str| {
        let r = p.sdpipe(&[
            "sample",
            "--model",
            model,
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd"),
            "--prompt",
            "a photo of zorb shape",
            "--steps",
            "3",
            "--sampler",
            "ddim",
            "--seed",
            "1",
            "--width",
            "16",
            "--height",
            "16",
            "--out",
            out,
        ]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        image::open(p.path(out)).unwrap().to_rgb8()
    };
    let tuned_img = sample(model.to_str().unwrap(), "tuned.png");
    let base_img = sample(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd"),
        "base.png",
    );
    assert_ne!(tuned_img.as_raw(), base_img.as_raw());

    let uninterrupted = std::fs::read(&model).unwrap();

    // More class images: only the new one is sampled.
    p.write_pipeline(pipeline(4));
    let more = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(more.code, 0, "{}", more.stderr);
    assert_eq!(p.stats("class")["images_computed"], 1);

    // Killed after a checkpoint, then resumed: the same bytes as the uninterrupted run.
    let r = killed_and_resumed(pipeline(3), 150);
    assert!(r.stats("train")["resumed_from"].as_u64().unwrap() > 0);
    assert!(
        uninterrupted == std::fs::read(r.path("outputs/t/train/model.safetensors")).unwrap(),
        "the resumed run ends with other weights than the uninterrupted one"
    );
}

#[test]
fn a_diverging_run_stops_with_a_clear_error_and_keeps_its_checkpoint() {
    // A sane rate up to step 5 (a checkpoint at step 4), then an absurd one.
    let text = pipeline(1).merge(toml::toml! {
        [stage.train]
        max_grad_norm = 0
        lr_scheduler = "1e-4:5, 1e12"
    });
    let p = Project::new(&text);
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(
        all.contains("diverged") && all.contains("last good checkpoint"),
        "no divergence message: {all}"
    );
    assert!(
        p.scratch_has_checkpoint(),
        "the last good checkpoint is gone"
    );
}

#[test]
fn dreambooth_can_train_the_text_encoder_too() {
    let text = with_text_encoder(2);
    let p = Project::new(&text);
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let stats = p.stats("train");
    assert!(
        stats["eval_loss_after"].as_f64().unwrap() < stats["eval_loss_before"].as_f64().unwrap(),
        "{stats}"
    );
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");
    let base = sdpipe::diffusion::Checkpoint::open(fixtures).unwrap();
    let tuned = sdpipe::diffusion::Checkpoint::open(p.path("outputs/t/train/model.safetensors"))
        .unwrap()
        .with_configs_from(fixtures)
        .unwrap();
    let (b, t) = (base.text_encoder_weights(), tuned.text_encoder_weights());
    for name in [
        "embeddings.token_embedding.weight",
        "embeddings.position_embedding.weight",
        "encoder.layers.0.self_attn.q_proj.weight",
        "final_layer_norm.bias",
    ] {
        assert_ne!(
            b.read(name).unwrap().0,
            t.read(name).unwrap().0,
            "text-encoder tensor {name} did not train"
        );
    }
    let unet: usize = base
        .unet_weights()
        .names()
        .map(|n| {
            base.unet_weights()
                .shape(n)
                .unwrap()
                .iter()
                .product::<usize>()
        })
        .sum();
    assert!(stats["trainable_params"].as_u64().unwrap() as usize > unet);
}

/// `precision = "f16"`: the whole UNet (and the text encoder) trains with the UNet computing in
/// mixed precision and an f32 master copy taking the updates; the loss falls like the f32 run's
/// and the checkpoint holds the f32 masters (not f16-rounded values).
#[test]
fn half_precision_dreambooth_tracks_f32() {
    let text = with_text_encoder(2).text();
    let (_, half_run) = crate::common::f32_and_f16_training(&text, "train", 0.05);

    // The saved UNet is the f32 masters: most values are not representable in f16.
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");
    let tuned =
        sdpipe::diffusion::Checkpoint::open(half_run.path("outputs/t/train/model.safetensors"))
            .unwrap()
            .with_configs_from(fixtures)
            .unwrap();
    let (w, _) = tuned.unet_weights().read("conv_in.weight").unwrap();
    let off_f16 = w
        .iter()
        .filter(|v| half::f16::from_f32(**v).to_f32() != **v)
        .count();
    println!(
        "conv_in.weight: {off_f16} of {} values off the f16 grid",
        w.len()
    );
    assert!(off_f16 > w.len() / 2);
}
