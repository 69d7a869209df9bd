//! The README's main command stays runnable: `pipelines/quickstart.toml` parses, its inputs (the
//! bundled base model, the heart dataset) exist, and it plans every stage of the DAG the README
//! describes. (Running it is the README's command; CI checks the plan, the stages have their own
//! tests.)

use std::process::Command;

#[test]
fn the_quickstart_plans_the_whole_dag() {
    let root = env!("CARGO_MANIFEST_DIR");
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sdpipe"))
        .current_dir(root)
        .args(["--cache-dir"])
        .arg(tmp.path().join("cache"))
        .args(["--outputs"])
        .arg(tmp.path().join("outputs"))
        .args(["plan", "pipelines/quickstart.toml", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for stage in [
        "caption",
        "preprocess",
        "latents",
        "class",
        "train@method=lora",
        "train@method=textual_inversion",
        "train@method=dreambooth",
        "train@method=hypernetwork",
        "lora_merged",
        "db_extract",
        "grid",
        "report",
    ] {
        assert!(
            stdout.contains(&format!("\"{stage}\"")),
            "{stage} not planned: {stdout}"
        );
    }
}

/// Every bundled pipeline parses and plans against the bundled model and data (the docs cite
/// their runs).
#[test]
fn every_bundled_pipeline_plans() {
    let root = env!("CARGO_MANIFEST_DIR");
    let tmp = tempfile::tempdir().unwrap();
    let mut files: Vec<_> = std::fs::read_dir(std::path::Path::new(root).join("pipelines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    for file in files {
        let out = Command::new(env!("CARGO_BIN_EXE_sdpipe"))
            .current_dir(root)
            .args(["--cache-dir"])
            .arg(tmp.path().join("cache"))
            .args(["--outputs"])
            .arg(tmp.path().join("outputs"))
            .arg("plan")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
