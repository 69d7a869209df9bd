//! `sdpipe watch`: a save re-plans (saying why) and reruns; a running stage whose key changed is
//! cancelled; an added input is picked up; the run's own outputs trigger nothing.

use std::io::Read;
use std::time::Duration;

use crate::common::{PipelineToml, Project, wait_for};

fn item_records(p: &Project) -> usize {
    std::fs::read_dir(p.path(".sdpipe/cache-v1/records/items"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn runs(p: &Project) -> usize {
    std::fs::read_dir(p.path("outputs/t/runs"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn watch_reruns_on_save_and_cancels_a_stage_whose_key_changed() {
    let p = Project::new(PipelineToml::basic());
    let mut child = p.spawn(
        &["watch", "p.toml", "--debounce-ms", "100"],
        &[
            ("SDPIPE_TEST_ITEM_DELAY_MS", "150"),
            ("RAYON_NUM_THREADS", "1"),
        ],
    );
    wait_for("the first run", || runs(&p) == 1);

    // A save reruns what it changed; while preprocess runs its first items, a second save
    // changes it again: the running stage is cancelled and the latest config runs.
    p.write_pipeline(PipelineToml::basic().set("stage.preprocess.resolution", 40));
    wait_for("preprocess at 40 px to start", || item_records(&p) > 6);
    p.write_pipeline(PipelineToml::basic().set("stage.preprocess.resolution", 48));
    // The run record is written last: once it shows 48 px, that run is over.
    wait_for("the run at 48 px to finish", || {
        std::fs::read(p.path("outputs/t/last-run.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|r| {
                r["stages"].as_array().is_some_and(|stages| {
                    stages.iter().any(|s| {
                        s["stage"] == "preprocess"
                            && s["params"]["resolution"] == 48
                            && s["outcome"]["status"] == "computed"
                    })
                })
            })
    });
    assert!(p.plan().iter().all(|(_, s, _)| s == "fresh"));
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(p.path("outputs/t/preprocess/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["items"][0]["size"], serde_json::json!([48, 48]));

    // An added image is picked up too.
    let before = runs(&p);
    p.add_image("late.png", 9);
    wait_for("the run for the added image", || runs(&p) > before);
    assert!(
        p.path("outputs/t/preprocess/items/late.png.safetensors")
            .is_file()
    );

    // Nothing else happens by itself: our own writes to outputs/ and .sdpipe/ are not changes.
    let settled = runs(&p);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(runs(&p), settled, "watch kept rerunning on its own outputs");

    child.kill().unwrap();
    child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        stderr.contains("preprocess.resolution 32 → 40"),
        "the plan says why: {stderr}"
    );
    assert!(
        stderr.contains("preprocess changed: cancelling it"),
        "{stderr}"
    );
    assert!(stderr.contains("1 image added"), "{stderr}");
}
