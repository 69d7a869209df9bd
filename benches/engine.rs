//! Engine benchmarks (run with `cargo bench --bench engine`), timing the real binary:
//!
//! - a fully cached rerun of the quickstart (goal: < 0.5 s wall on a 2-core machine);
//! - `plan` on a generated 200-stage pipeline, before any run and when all is fresh (goal: < 1 s).
//!
//! Prints min / median / max over repeated runs. Not a test: nothing here fails on a slow machine.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn sdpipe(dir: &Path, args: &[&str]) -> Duration {
    let start = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_sdpipe"))
        .args(args)
        .arg("--quiet")
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run sdpipe");
    let elapsed = start.elapsed();
    assert!(status.success(), "sdpipe {args:?} failed");
    elapsed
}

fn report(name: &str, goal_s: f64, mut times: Vec<Duration>) {
    times.sort();
    let s = |d: Duration| d.as_secs_f64();
    let median = s(times[times.len() / 2]);
    println!(
        "{name:<44} min {:>7.3}s  median {:>7.3}s  max {:>7.3}s  (goal < {goal_s} s: {})",
        s(times[0]),
        median,
        s(times[times.len() - 1]),
        if median < goal_s { "met" } else { "NOT met" }
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    copy_dir(
        &root.join("datasets/toy-shapes"),
        &dir.join("datasets/toy-shapes"),
    );
    copy_dir(&root.join("pipelines"), &dir.join("pipelines"));
    copy_dir(
        &root.join("tests/fixtures/tiny-sd"),
        &dir.join("tests/fixtures/tiny-sd"),
    );

    // 1. Fully cached quickstart rerun (caption, preprocess, encode_latents).
    sdpipe(dir, &["run", "pipelines/quickstart.toml"]);
    let times = (0..15)
        .map(|_| sdpipe(dir, &["run", "pipelines/quickstart.toml"]))
        .collect();
    report("quickstart, fully cached rerun", 0.5, times);

    // 2. A generated 200-stage pipeline: 100 caption stages, each feeding a preprocess stage.
    let mut text = String::from("[pipeline]\nname = \"big\"\nseed = 3\n");
    for i in 0..100 {
        text.push_str(&format!(
            "\n[stage.cap{i}]\nkind = \"caption\"\nimages = \"datasets/toy-shapes\"\ntemplate = \"a photo of {{token}} number {i}\"\ntoken = \"zorb\"\n\n[stage.pre{i}]\nkind = \"preprocess\"\nneeds = [\"cap{i}\"]\nresolution = 32\n"
        ));
    }
    std::fs::write(dir.join("big.toml"), text).unwrap();
    let times = (0..7).map(|_| sdpipe(dir, &["plan", "big.toml"])).collect();
    report("plan, 200 stages, never run", 1.0, times);
    sdpipe(dir, &["run", "big.toml"]);
    let times = (0..7).map(|_| sdpipe(dir, &["plan", "big.toml"])).collect();
    report("plan, 200 stages, all fresh", 1.0, times);
    let times = (0..7).map(|_| sdpipe(dir, &["run", "big.toml"])).collect();
    report("run, 200 stages, all cached", 1.0, times);
}
