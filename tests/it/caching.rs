//! The cache as users see it through the binary: what reruns and what does not.

use crate::common::{PipelineToml, Project};

#[test]
fn second_run_is_all_cached_and_does_no_work() {
    let p = Project::new(PipelineToml::basic());
    let first = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(first.code, 0, "{}{}", first.stdout, first.stderr);
    assert_eq!(p.outcome("caption"), "computed");
    assert_eq!(p.outcome("preprocess"), "computed");
    assert!(p.path("outputs/t/preprocess/manifest.json").is_file());
    assert!(
        p.path("outputs/t/preprocess/items/zorb-01.png.safetensors")
            .is_file()
    );

    let second = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(second.code, 0);
    assert!(
        second.stdout.contains("0 computed, 2 cached"),
        "{}",
        second.stdout
    );
    assert_eq!(p.outcome("caption"), "cached");
    assert_eq!(p.outcome("preprocess"), "cached");
    assert!(p.plan().iter().all(|(_, status, _)| status == "fresh"));
}

#[test]
fn plan_writes_nothing() {
    let p = Project::new(PipelineToml::basic());
    let plan = p.plan();
    assert_eq!(plan.len(), 2);
    assert!(
        plan.iter()
            .all(|(_, s, r)| s == "stale" && r == "never run")
    );
    assert!(!p.path(".sdpipe").exists(), "plan created the cache");
    assert!(!p.path("outputs").exists(), "plan created outputs");
}

/// The basic pipeline (without a seed) and a second, independent caption → preprocess branch.
fn two_branches() -> PipelineToml {
    PipelineToml::basic()
        .remove("pipeline.seed")
        .merge(toml::toml! {
            [stage.other]
            kind = "caption"
            images = "images"
            template = "{filename}"

            [stage.other_pre]
            kind = "preprocess"
            needs = ["other"]
            resolution = 32
        })
}

#[test]
fn editing_one_param_makes_exactly_that_stage_and_its_dependents_stale() {
    let p = Project::new(two_branches());
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);

    p.write_pipeline(two_branches().set("stage.preprocess.resolution", 48));
    let plan = p.plan();
    let status: Vec<(&str, &str)> = plan
        .iter()
        .map(|(s, st, _)| (s.as_str(), st.as_str()))
        .collect();
    assert_eq!(
        status,
        vec![
            ("caption", "fresh"),
            ("preprocess", "stale"),
            ("other", "fresh"),
            ("other_pre", "fresh")
        ]
    );
    // min_size follows the resolution (half of it) unless set, so it changes too.
    assert_eq!(
        p.status_of("preprocess").1,
        "preprocess.min_size 16 → 24; preprocess.resolution 32 → 48"
    );

    p.write_pipeline(two_branches().set("stage.caption.template", "a drawing of {token} {class}"));
    let plan = p.plan();
    let status: Vec<(&str, &str)> = plan
        .iter()
        .map(|(s, st, _)| (s.as_str(), st.as_str()))
        .collect();
    assert_eq!(
        status,
        vec![
            ("caption", "stale"),
            ("preprocess", "stale"),
            ("other", "fresh"),
            ("other_pre", "fresh")
        ]
    );
    assert_eq!(
        p.status_of("caption").1,
        r#"caption.template "a photo of {token} {class}" → "a drawing of {token} {class}""#
    );
    assert_eq!(p.status_of("preprocess").1, "upstream caption changed");
}

#[test]
fn formatting_comments_order_and_explicit_defaults_change_no_key() {
    let p = Project::new(PipelineToml::basic());
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);
    // Same pipeline: comments, other key order, inline tables, and every default written out.
    p.write_pipeline(
        r#"
# a comment
[stage.preprocess]
needs = ["caption"]   # trailing comment
kind = "preprocess"
resolution = 32
mode = "crop"
crop = "center"
flip = false
on_bad_image = "fail"
min_size = 16

[pipeline]
seed = 1
name = "t"
device = "auto"
precision = "f32"

[stage.caption]
class = "star"
token = "zorb"
template = "a photo of {token} {class}"
kind = "caption"
images = "./images"
recursive = false
use_sidecars = true
sidecar_extensions = [".TXT", "caption"]
"#,
    );
    let plan = p.plan();
    assert!(plan.iter().all(|(_, s, _)| s == "fresh"), "{plan:?}");
}

#[test]
fn each_result_affecting_field_changes_the_key() {
    let p = Project::new(PipelineToml::basic());
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);
    let base = PipelineToml::basic;
    let edits = [
        (base().set("stage.caption.token", "zorp"), "caption"),
        (base().set("stage.caption.class", "sun"), "caption"),
        (base().set("stage.preprocess.resolution", 40), "preprocess"),
        (base().set("stage.preprocess.flip", true), "preprocess"),
        (base().set("stage.preprocess.crop", "random"), "preprocess"),
        (base().set("stage.preprocess.min_size", 8), "preprocess"),
        (
            base().merge(toml::toml! {
                [stage.preprocess]
                mode = "bucket"
                bucket = { min = 16, max = 64, step = 16 }
            }),
            "preprocess",
        ),
        (
            base().set("stage.preprocess.on_bad_image", "skip"),
            "preprocess",
        ),
        (base().set("stage.caption.use_sidecars", false), "caption"),
    ];
    for (edited, stage) in &edits {
        p.write_pipeline(edited);
        let (status, reason) = p.status_of(stage);
        assert_eq!(status, "stale", "editing\n{edited}\nleft {stage} fresh");
        assert!(
            reason.contains(stage),
            "reason {reason:?} does not name the field"
        );
    }
    // A random crop depends on the pipeline seed; a center crop does not.
    let random = base().set("stage.preprocess.crop", "random");
    p.write_pipeline(&random);
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);
    p.write_pipeline(random.set("pipeline.seed", 2));
    assert_eq!(p.status_of("preprocess").0, "stale");
    assert_eq!(p.status_of("caption").0, "fresh");
    p.write_pipeline(base().set("pipeline.seed", 2));
    assert_eq!(p.status_of("preprocess").0, "fresh");
}

#[test]
fn adding_one_image_preprocesses_only_that_image() {
    let p = Project::new(PipelineToml::basic());
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);
    assert_eq!(p.stats("preprocess")["images_computed"], 6);

    p.add_image("new-one.png", 7);
    let (status, reason) = p.status_of("caption");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("stale", "1 image added")
    );
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(p.stats("preprocess")["images_computed"], 1);
    assert_eq!(p.stats("preprocess")["images_reused"], 6);
    assert!(
        p.path("outputs/t/preprocess/items/new-one.png.safetensors")
            .is_file()
    );

    // Editing a sidecar changes the caption stage only through that file.
    std::fs::write(p.path("images/zorb-01.txt"), "a zorb, edited").unwrap();
    assert_eq!(p.status_of("caption").1, "1 caption file changed");
}

#[test]
fn force_recomputes_a_cached_stage() {
    let p = Project::new(PipelineToml::basic());
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);
    let run = p.sdpipe(&["run", "p.toml", "--force", "preprocess"]);
    assert_eq!(run.code, 0);
    assert_eq!(p.outcome("caption"), "cached");
    assert_eq!(p.outcome("preprocess"), "computed");
    let bad = p.sdpipe(&["run", "p.toml", "--force", "preproces"]);
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr.contains("did you mean `preprocess`"),
        "{}",
        bad.stderr
    );
}

#[test]
fn matrix_expands_into_named_instances_sharing_upstream() {
    let text = PipelineToml::basic()
        .remove("stage.preprocess.resolution")
        .set("stage.preprocess.matrix.resolution", vec![32, 48])
        .set("stage.preprocess.matrix.flip", vec![false, true]);
    let p = Project::new(&text);
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let names: Vec<String> = p.plan().into_iter().map(|(s, _, _)| s).collect();
    assert_eq!(
        names,
        vec![
            "caption",
            "preprocess@resolution=32,flip=false",
            "preprocess@resolution=32,flip=true",
            "preprocess@resolution=48,flip=false",
            "preprocess@resolution=48,flip=true",
        ]
    );
    assert!(
        p.path("outputs/t/preprocess@resolution=48,flip=true/manifest.json")
            .is_file()
    );
}

#[test]
fn gc_keeps_what_the_last_run_uses() {
    let p = Project::new(PipelineToml::basic());
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);
    p.write_pipeline(PipelineToml::basic().set("stage.preprocess.resolution", 40));
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);
    let dry = p.sdpipe(&["cache", "gc", "--dry-run", "--max-age", "0s"]);
    // The first run's stage record and its six per-image records are no longer used.
    assert!(
        dry.stdout.starts_with("would remove 7 records"),
        "{}",
        dry.stdout
    );
    let gc = p.sdpipe(&["cache", "gc", "--max-age", "0s"]);
    assert_eq!(gc.code, 0);
    assert!(p.plan().iter().all(|(_, s, _)| s == "fresh"));
    assert_eq!(p.sdpipe(&["cache", "verify"]).code, 0);
    p.write_pipeline(PipelineToml::basic());
    assert_eq!(
        p.status_of("preprocess").0,
        "stale",
        "the collected entry is gone"
    );
    let size = p.sdpipe(&["cache", "size", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&size.stdout).unwrap();
    assert!(v["blobs"].as_u64().unwrap() > 0);
}

#[test]
fn exif_orientation_buckets_and_flips_are_applied_and_reported() {
    let text = PipelineToml::basic().merge(toml::toml! {
        [stage.preprocess]
        resolution = 64
        mode = "bucket"
        bucket = { min = 32, max = 128, step = 16 }
        flip = true
        crop = "random"
    });
    let p = Project::new(&text);
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(p.path("outputs/t/preprocess/manifest.json")).unwrap(),
    )
    .unwrap();
    let items = manifest["items"].as_array().unwrap();
    assert_eq!(items.len(), 12, "six images and their flipped copies");
    let rotated = items.iter().find(|i| i["name"] == "zorb-05.jpg").unwrap();
    // Stored as 108x192 with EXIF orientation 6: decoded as the 192x108 landscape it shows.
    assert_eq!(rotated["original"], serde_json::json!([192, 108]));
    assert_eq!(
        rotated["size"],
        serde_json::json!([80, 48]),
        "a wide bucket"
    );
    let flipped = items
        .iter()
        .find(|i| i["name"] == "zorb-05.jpg.flip")
        .unwrap();
    assert_eq!(flipped["flipped"], true);
    assert_ne!(flipped["tensor"]["digest"], rotated["tensor"]["digest"]);
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(p.path("outputs/t/preprocess/buckets.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        report["items"]["zorb-05.jpg"][0],
        serde_json::json!([80, 48])
    );
    let counted: u64 = report["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, 12);
}
