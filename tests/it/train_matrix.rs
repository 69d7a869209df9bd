//! One `matrix.method` train stage gives each method its own learning rate when its table sets
//! `lr`, and the stage's `lr` otherwise; a bad per-method rate is reported at its key.

use std::path::Path;

use sdpipe::stages::StageParams;

use crate::common::PipelineToml;

fn pipeline(ti_lr: impl Into<toml::Value>) -> PipelineToml {
    let root = env!("CARGO_MANIFEST_DIR");
    PipelineToml::new(0)
        .set(
            "pipeline.base_model",
            format!("{root}/tests/fixtures/tiny-sd"),
        )
        .stage("caption", "caption", &[])
        .set("stage.caption.images", format!("{root}/datasets/heart"))
        .stage("preprocess", "preprocess", &["caption"])
        .stage("latents", "encode_latents", &["preprocess"])
        .merge(toml::toml! {
            [stage.train]
            kind = "train"
            needs = ["latents"]
            matrix.method = ["lora", "textual_inversion", "dreambooth", "hypernetwork"]
            lr = 1e-4

            [stage.train.lora]
            lr = 2e-4

            [stage.train.textual_inversion]
            token = "zorb"

            [stage.train.hypernetwork]
            lr = 3e-5
        })
        .set("stage.train.textual_inversion.lr", ti_lr)
}

#[test]
fn each_method_trains_at_its_own_rate() {
    let p = sdpipe::pipeline::parse(Path::new("p.toml"), &pipeline(5e-3).text()).unwrap();
    let lr = |name: &str| match &p.stage(name).unwrap().params {
        StageParams::Train(t) => t.lr,
        other => panic!("{name} is {other:?}"),
    };
    assert_eq!(lr("train@method=lora"), 2e-4);
    assert_eq!(lr("train@method=textual_inversion"), 5e-3);
    assert_eq!(lr("train@method=dreambooth"), 1e-4);
    assert_eq!(lr("train@method=hypernetwork"), 3e-5);
}

#[test]
fn a_bad_method_rate_points_at_its_key() {
    let err = sdpipe::pipeline::parse(Path::new("p.toml"), &pipeline(-1).text()).unwrap_err();
    assert!(
        err.message
            .contains("textual_inversion.lr = -1 must be a positive number"),
        "{err:?}"
    );
    assert_eq!(err.line, 31, "{err:?}");
}
