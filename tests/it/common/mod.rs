//! Helpers for tests that drive the real `sdpipe` binary in a temporary project.

#![allow(dead_code)]

use std::fmt::Display;
use std::path::{Path, PathBuf};

mod pipeline_toml;
pub use pipeline_toml::PipelineToml;
use std::process::{Child, Command, Output, Stdio};

/// A temporary project: a copy of the toy dataset and a pipeline file.
pub struct Project {
    pub dir: tempfile::TempDir,
}

/// The result of one command.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Project {
    /// Whether a training stage has written a checkpoint into its scratch dir yet.
    pub fn scratch_has_checkpoint(&self) -> bool {
        std::fs::read_dir(self.path(".sdpipe/cache-v1/scratch"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| {
                std::fs::read_dir(d.path().join("checkpoints"))
                    .map(|c| {
                        c.flatten()
                            .any(|e| e.file_name().to_string_lossy().starts_with("step-"))
                    })
                    .unwrap_or(false)
            })
    }

    /// A project with the toy dataset in `images/` and `pipeline` as `p.toml`.
    pub fn new(pipeline: impl Display) -> Project {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/toy-shapes");
        for entry in std::fs::read_dir(src).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e != "md") {
                std::fs::copy(&p, images.join(p.file_name().unwrap())).unwrap();
            }
        }
        let project = Project { dir };
        project.write_pipeline(pipeline);
        project
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write_pipeline(&self, text: impl Display) {
        std::fs::write(self.path("p.toml"), text.to_string()).unwrap();
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdpipe"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_remove("SDPIPE_CACHE_DIR")
            .env_remove("SDPIPE_OUTPUTS")
            .env_remove("SDPIPE_TEST_ITEM_DELAY_MS")
            .stdin(Stdio::null());
        cmd
    }

    pub fn sdpipe(&self, args: &[&str]) -> Run {
        Run::from(self.command(args).output().unwrap())
    }

    /// `sdpipe sample` of the tiny grid's first cell (see `PipelineToml::tiny_grid`: "a photo
    /// of zorb", seed 1, 4 DDIM steps, 16×16) on the tiny fixture model, with `extra`
    /// arguments (`--lora FILE`, `--embedding FILE:token`, …); the sampled image.
    pub fn sample_tiny_cell(&self, extra: &[&str]) -> image::RgbImage {
        let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");
        let out = self.path("tiny-cell.png");
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
        args.extend_from_slice(extra);
        let run = self.sdpipe(&args);
        assert_eq!(
            run.code, 0,
            "sample {extra:?}: {}{}",
            run.stdout, run.stderr
        );
        image::open(&out).unwrap().to_rgb8()
    }

    pub fn spawn(&self, args: &[&str], env: &[(&str, &str)]) -> Child {
        let mut cmd = self.command(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `plan --json` as (stage, status, reason) triples.
    pub fn plan(&self) -> Vec<(String, String, String)> {
        let run = self.sdpipe(&["plan", "--json", "p.toml"]);
        assert_eq!(run.code, 0, "plan failed: {}", run.stderr);
        let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["stage"].as_str().unwrap().to_string(),
                    e["status"].as_str().unwrap().to_string(),
                    e["reason"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    pub fn status_of(&self, stage: &str) -> (String, String) {
        self.plan()
            .into_iter()
            .find(|(s, _, _)| s == stage)
            .map(|(_, st, r)| (st, r))
            .unwrap_or_else(|| panic!("no stage {stage} in plan"))
    }

    /// The last run record.
    pub fn last_run(&self) -> serde_json::Value {
        let bytes = std::fs::read(self.path("outputs/t/last-run.json")).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// Outcome status of `stage` in the last run ("computed", "cached", "failed", ...).
    pub fn outcome(&self, stage: &str) -> String {
        let run = self.last_run();
        run["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == stage)
            .map(|s| s["outcome"]["status"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no stage {stage} in last run"))
    }

    pub fn stats(&self, stage: &str) -> serde_json::Value {
        let run = self.last_run();
        run["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == stage)
            .unwrap()["stats"]
            .clone()
    }

    /// Writes a new PNG (content differs per `seed`) into `images/`.
    pub fn add_image(&self, name: &str, seed: u8) {
        let img = image::RgbImage::from_fn(48, 40, |x, y| {
            image::Rgb([seed, (x * 5) as u8, (y * 6) as u8])
        });
        img.save(self.path("images").join(name)).unwrap();
    }
}

/// Waits until `cond` holds, for at most 60 s.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Number of entries in `dir` (0 if absent).
pub fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// A project running `pipeline`, killed after its first training checkpoint (every item slowed
/// by `delay_ms` so the kill lands mid-run) and run again to the end, which must succeed.
pub fn killed_and_resumed(pipeline: impl Display, delay_ms: u64) -> Project {
    let r = Project::new(pipeline);
    let delay = delay_ms.to_string();
    let mut child = r.spawn(&["run", "p.toml"], &[("SDPIPE_TEST_ITEM_DELAY_MS", &delay)]);
    wait_for("a training checkpoint", || r.scratch_has_checkpoint());
    child.kill().unwrap();
    child.wait().unwrap();
    let run = r.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "resumed run: {}{}", run.stdout, run.stderr);
    r
}

/// Runs `text` in one project (f32) and with `precision = "f16"` in another, and compares the
/// train stage `stage`: both runs succeed, the f16 run lowers its evaluation loss, and ends
/// within `tolerance` (relative) of the f32 run's final loss. Returns (f32, f16) projects.
pub fn f32_and_f16_training(text: &str, stage: &str, tolerance: f64) -> (Project, Project) {
    let half_text = text.replacen("[pipeline]\n", "[pipeline]\nprecision = \"f16\"\n", 1);
    assert_ne!(
        half_text, text,
        "no [pipeline] table to set the precision in"
    );
    let mut projects = Vec::new();
    for t in [text, half_text.as_str()] {
        let p = Project::new(t);
        let run = p.sdpipe(&["run", "p.toml"]);
        assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
        projects.push(p);
    }
    let half = projects.pop().expect("two projects");
    let full = projects.pop().expect("two projects");
    let (s32, s16) = (full.stats(stage), half.stats(stage));
    let loss = |s: &serde_json::Value, k: &str| s[k].as_f64().expect("an eval loss");
    println!(
        "{stage}: eval loss f32 {:.4} → {:.4}, f16 {:.4} → {:.4}",
        loss(&s32, "eval_loss_before"),
        loss(&s32, "eval_loss_after"),
        loss(&s16, "eval_loss_before"),
        loss(&s16, "eval_loss_after")
    );
    assert!(loss(&s16, "eval_loss_after") < loss(&s16, "eval_loss_before"));
    let before_gap = (loss(&s16, "eval_loss_before") - loss(&s32, "eval_loss_before")).abs();
    assert!(
        before_gap < 1e-2 * loss(&s32, "eval_loss_before"),
        "{stage}: the f16 model's loss before training is {before_gap} off f32's"
    );
    let gap = (loss(&s16, "eval_loss_after") - loss(&s32, "eval_loss_after")).abs();
    assert!(
        gap < tolerance * loss(&s32, "eval_loss_after"),
        "{stage}: f16 ends {gap} off the f32 loss"
    );
    (full, half)
}
