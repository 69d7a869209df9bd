//! The `train` stage with `method = "textual_inversion"` on the tiny fixture model: only the
//! token's vectors train, the loss goes down, A1111 and diffusers files come out, the grid shows
//! the token's effect, and `sdpipe sample --embedding` reads the file.

use crate::common::{PipelineToml, Project};

fn pipeline() -> PipelineToml {
    PipelineToml::tiny_latents(3)
        .set("stage.caption.use_sidecars", false)
        .merge(toml::toml! {
            [stage.train]
            kind = "train"
            needs = ["latents"]
            method = "textual_inversion"
            steps = 40
            lr = 5e-3
            checkpoint_every = 10

            [stage.train.textual_inversion]
            token = "zorb"
            init_word = "star"
            num_vectors = 2
        })
        .tiny_grid("grid", &["train"])
}

#[test]
fn textual_inversion_learns_and_writes_a1111_and_diffusers_files() {
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
        "textual inversion did not lower the evaluation loss: {before} → {after}"
    );
    assert_eq!(stats["trainable_params"], 2 * 32);

    let a1111 = sdpipe::formats::read_safetensors(&p.path("outputs/t/train/embedding.safetensors"))
        .unwrap();
    assert_eq!(a1111.tensors["emb_params"].shape, vec![2, 32]);
    assert_eq!(a1111.metadata.get("name").map(String::as_str), Some("zorb"));
    let diffusers =
        sdpipe::formats::read_safetensors(&p.path("outputs/t/train/learned_embeds.safetensors"))
            .unwrap();
    assert_eq!(diffusers.tensors["zorb"], a1111.tensors["emb_params"]);

    let base = image::open(p.path("outputs/t/grid/images/base/00-1.png"))
        .unwrap()
        .to_rgb8();
    let trained = image::open(p.path("outputs/t/grid/images/train/00-1.png"))
        .unwrap()
        .to_rgb8();
    assert_ne!(
        base.as_raw(),
        trained.as_raw(),
        "the embedding does not change the sampled image"
    );

    // The command line reads the A1111 file (token given) and draws the same image.
    let emb = format!(
        "{}:zorb",
        p.path("outputs/t/train/embedding.safetensors").display()
    );
    assert_eq!(
        p.sample_tiny_cell(&["--embedding", &emb]).as_raw(),
        trained.as_raw()
    );

    // Deterministic: another project gives the same vectors.
    let q = Project::new(pipeline());
    assert_eq!(q.sdpipe(&["run", "p.toml"]).code, 0);
    let again = sdpipe::formats::read_safetensors(&q.path("outputs/t/train/embedding.safetensors"))
        .unwrap();
    assert_eq!(again.tensors["emb_params"], a1111.tensors["emb_params"]);
}

#[test]
fn a_token_missing_from_the_captions_is_an_error() {
    let text = pipeline().set("stage.train.textual_inversion.token", "blorp");
    let p = Project::new(&text);
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stdout.contains("no caption contains the token `blorp`"),
        "{}",
        run.stdout
    );
    let text = pipeline().remove("stage.train.textual_inversion.token");
    let p = Project::new(&text);
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("textual inversion needs a `token`"),
        "{}",
        run.stderr
    );
}

/// `precision = "f16"`: the vectors train through the UNet in mixed precision (f32 text
/// encoder and vectors, loss scaling); the loss falls like the f32 run's.
#[test]
fn half_precision_textual_inversion_tracks_f32() {
    crate::common::f32_and_f16_training(&pipeline().text(), "train", 0.05);
}
