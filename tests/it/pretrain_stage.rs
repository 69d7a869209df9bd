//! The `pretrain` stage on a miniature architecture: both phases lower their loss, the result
//! is a single-file model that opens with its own configs (no config folder) and samples; a
//! killed run resumes to the same bytes; a bad parameter is reported at its key.

use crate::common::{PipelineToml, Project, killed_and_resumed};

fn pipeline() -> PipelineToml {
    PipelineToml::new(3).merge(toml::toml! {
        [stage.base]
        kind = "pretrain"
        resolution = 32
        vae_steps = 8
        unet_steps = 8
        batch_size = 4
        vae_batch_size = 2
        lr_warmup_steps = 2
        checkpoint_every = 4
        save_dtype = "f32"

        [stage.base.architecture]
        unet_channels = [16, 32]
        unet_heads = 2
        norm_groups = 4
        vae_channels = [8, 16]
        latent_channels = 4
        text_width = 16
        text_layers = 1
        text_heads = 2
    })
}

#[test]
fn pretraining_learns_writes_a_self_describing_model_and_resumes_identically() {
    let p = Project::new(pipeline());
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let stats = p.stats("base");
    let f = |k: &str| stats[k].as_f64().unwrap();
    assert!(
        f("vae_loss_last") < f("vae_loss_first"),
        "the VAE loss did not fall: {stats}"
    );
    assert!(f("scaling_factor").is_finite() && f("scaling_factor") > 0.0);
    assert!(f("train_loss_last").is_finite());

    // The model opens with the configs stored in it: heads, groups and scaling included.
    let model = p.path("outputs/t/base/model.safetensors");
    let ckpt = sdpipe::diffusion::Checkpoint::open(&model).unwrap();
    assert_eq!(ckpt.unet_config.block_out_channels, vec![16, 32]);
    assert_eq!(ckpt.unet_config.norm_num_groups, 4);
    assert_eq!(ckpt.clip_config.num_attention_heads, 2);
    assert_eq!(ckpt.vae_config.block_out_channels, vec![8, 16]);
    assert!((ckpt.vae_config.scaling_factor - f("scaling_factor")).abs() < 1e-9);
    let sample = p.sdpipe(&[
        "sample",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red circle on a blue background",
        "--steps",
        "3",
        "--seed",
        "1",
        "--width",
        "32",
        "--height",
        "32",
        "--out",
        "s.png",
    ]);
    assert_eq!(sample.code, 0, "{}", sample.stderr);
    assert_eq!(image::open(p.path("s.png")).unwrap().width(), 32);
    let uninterrupted = std::fs::read(&model).unwrap();

    // Killed after a checkpoint, then resumed: the same bytes.
    let r = killed_and_resumed(pipeline(), 150);
    assert!(r.stats("base")["resumed_from"].as_u64().unwrap() > 0);
    assert!(
        uninterrupted == std::fs::read(r.path("outputs/t/base/model.safetensors")).unwrap(),
        "the resumed run ends with other weights than the uninterrupted one"
    );
}

#[test]
fn a_bad_parameter_is_reported_at_its_key() {
    let p = Project::new(pipeline().set("stage.base.world", "space"));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("unknown world `space`"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("shapes"), "{}", run.stderr);
    assert!(run.stderr.contains("p.toml:"), "{}", run.stderr);
}

fn continued(base: &str) -> PipelineToml {
    PipelineToml::new(4)
        .set("pipeline.name", "c")
        .set("pipeline.base_model", base)
        .merge(toml::toml! {
            [stage.more]
            kind = "pretrain"
            init = "base_model"
            resolution = 32
            vae_steps = 0
            unet_steps = 6
            batch_size = 4
            lr_warmup_steps = 2
            checkpoint_every = 0
            save_dtype = "f32"
        })
}

#[test]
fn pretraining_continues_from_a_base_model_keeping_its_vae() {
    let p = Project::new(pipeline());
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);
    let base = p.path("outputs/t/base/model.safetensors");
    let c = Project::new(continued(base.to_str().unwrap()));
    let run = c.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let before = sdpipe::diffusion::Checkpoint::open(&base).unwrap();
    let after =
        sdpipe::diffusion::Checkpoint::open(c.path("outputs/c/more/model.safetensors")).unwrap();
    // The architecture and the untrained VAE (and its scaling) are the base model's.
    assert_eq!(after.unet_config.block_out_channels, vec![16, 32]);
    assert_eq!(
        after.vae_config.scaling_factor,
        before.vae_config.scaling_factor
    );
    let same = |a: &sdpipe::diffusion::nn::weights::WeightStore,
                b: &sdpipe::diffusion::nn::weights::WeightStore| {
        a.names().all(|n| a.read(n).unwrap() == b.read(n).unwrap())
    };
    assert!(same(before.vae_weights(), after.vae_weights()));
    assert!(!same(before.unet_weights(), after.unet_weights()));

    // Its architecture is the base model's: a table of its own is refused at its key.
    let bad = continued(base.to_str().unwrap()).set("stage.more.architecture.unet_heads", 2);
    let c = Project::new(&bad);
    let run = c.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr
            .contains("the architecture comes from the base model"),
        "{}",
        run.stderr
    );
}
