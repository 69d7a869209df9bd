//! The peak-memory estimate of train stages: `plan` prints it, and `run` refuses a pipeline
//! whose stale train stage cannot fit before anything starts (exit code 4), unless
//! `--no-memory-check`. The available memory is injected with `SDPIPE_MEMORY_LIMIT`.

use crate::common::{PipelineToml, Project, Run};

fn pipeline(batch: usize) -> PipelineToml {
    PipelineToml::tiny_latents(5)
        .merge(toml::toml! {
            [stage.train_lora]
            kind = "train"
            needs = ["latents"]
            method = "lora"
            steps = 2

            [stage.train_full]
            kind = "train"
            needs = ["latents"]
            method = "dreambooth"
            steps = 2
        })
        .set("stage.train_lora.batch_size", batch as i64)
        .set("stage.train_full.batch_size", batch as i64)
}

fn with_limit(p: &Project, limit: &str, args: &[&str]) -> Run {
    let out = p
        .command(args)
        .env("SDPIPE_MEMORY_LIMIT", limit)
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `plan`'s estimate of `stage` in bytes, parsed back from `~12.3 MiB (…)`.
fn planned_bytes(p: &Project, stage: &str) -> f64 {
    let run = with_limit(p, "64GiB", &["plan", "p.toml"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout
            .contains("peak memory estimate on cpu, 64.0 GiB available (SDPIPE_MEMORY_LIMIT)"),
        "{}",
        run.stdout
    );
    let line = run
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with(stage) && l.contains('~'))
        .unwrap_or_else(|| panic!("no estimate for {stage}:\n{}", run.stdout));
    let figure = line.split('~').nth(1).unwrap();
    let mut parts = figure.split_whitespace();
    let value: f64 = parts.next().unwrap().parse().unwrap();
    let unit = parts.next().unwrap();
    let scale = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        u => panic!("unit {u}"),
    };
    value * scale
}

#[test]
fn plan_prints_an_estimate_that_grows_with_the_batch() {
    let p = Project::new(pipeline(1));
    let lora1 = planned_bytes(&p, "train_lora");
    let full1 = planned_bytes(&p, "train_full");
    assert!(full1 > lora1, "full fine-tuning {full1} <= LoRA {lora1}");
    p.write_pipeline(pipeline(8));
    let lora8 = planned_bytes(&p, "train_lora");
    assert!(lora8 > lora1, "batch 8 {lora8} <= batch 1 {lora1}");
}

#[test]
fn a_run_that_cannot_fit_is_refused_before_it_starts() {
    let p = Project::new(pipeline(2));
    let run = with_limit(&p, "1MiB", &["run", "p.toml"]);
    assert_eq!(run.code, 4, "{}{}", run.stdout, run.stderr);
    for part in [
        "stage `train_lora` needs about",
        "on cpu but 1.0 MiB is available (SDPIPE_MEMORY_LIMIT)",
        "lower `batch_size` (now 2)",
        "preprocess `resolution` (now 16",
        "--no-memory-check",
    ] {
        assert!(
            run.stderr.contains(part),
            "`{part}` missing:\n{}",
            run.stderr
        );
    }
    // nothing ran: not even the caption stage
    assert!(!p.path(".sdpipe/cache-v1").join("records").exists());
    assert!(!p.path("outputs/t/caption").exists());

    // plan says so too, without failing
    let plan = with_limit(&p, "1MiB", &["plan", "p.toml"]);
    assert_eq!(plan.code, 0, "{}", plan.stderr);
    assert!(plan.stdout.contains("WILL NOT FIT"), "{}", plan.stdout);
    assert!(
        plan.stderr.contains("`sdpipe run` would refuse"),
        "{}",
        plan.stderr
    );

    // a malformed limit is a usage error
    let bad = with_limit(&p, "lots", &["run", "p.toml"]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("SDPIPE_MEMORY_LIMIT"), "{}", bad.stderr);
}

#[test]
fn no_memory_check_runs_anyway() {
    let p = Project::new(pipeline(1));
    let run = with_limit(&p, "1MiB", &["run", "--no-memory-check", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("WILL NOT FIT"), "{}", run.stderr);
}

/// `watch` checks each run like `run` does: a pipeline that will not fit is refused before any
/// stage starts, and watch waits for a change instead of running it.
#[test]
fn watch_refuses_a_run_that_cannot_fit_and_waits() {
    use std::io::{BufRead, BufReader};
    let p = Project::new(pipeline(2));
    let mut child = p.spawn(
        &["watch", "p.toml", "--debounce-ms", "100"],
        &[("SDPIPE_MEMORY_LIMIT", "1MiB")],
    );
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !seen.contains("waiting for a change that makes it fit") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(_) => break,
        }
    }
    child.kill().unwrap();
    let _ = child.wait();
    assert!(
        seen.contains("waiting for a change that makes it fit"),
        "watch did not refuse:\n{seen}"
    );
    assert!(
        seen.contains("stage `train_lora` needs about") && seen.contains("1.0 MiB is available"),
        "{seen}"
    );
    assert!(!p.path("outputs/t/caption").exists(), "a stage ran");
}

/// `plan --json` carries each train stage's estimate (the same total as the text plan) and
/// whether it fits, beside the plan entries; other stages have no `memory`.
#[test]
fn plan_json_carries_the_estimates() {
    let p = Project::new(pipeline(1));
    let run = with_limit(&p, "1MiB", &["plan", "--json", "p.toml"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let entries: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let by_stage = |name: &str| {
        entries
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["stage"] == name)
            .unwrap_or_else(|| panic!("no {name} in {entries}"))
            .clone()
    };
    let lora = by_stage("train_lora");
    let memory = &lora["memory"];
    assert_eq!(memory["device"], "cpu");
    assert_eq!(memory["fits"], false);
    assert_eq!(memory["available_bytes"], 1 << 20);
    let total = memory["estimate"]["total"].as_f64().unwrap();
    let text = planned_bytes(&p, "train_lora");
    assert!(
        (total - text).abs() / text < 0.01,
        "json {total} vs text plan {text}"
    );
    assert!(memory["estimate"]["activations"].as_u64().unwrap() > 0);
    assert!(by_stage("caption").get("memory").is_none());
}

/// When the trained parameters, not the activations, are what does not fit, the advice names
/// the key that sizes them first: a smaller batch does not fix a rank of 100000.
#[test]
fn a_huge_rank_is_refused_naming_the_rank() {
    let text = pipeline(1)
        .remove("stage.train_full")
        .set("stage.train_lora.lora.rank", 100000);
    let p = Project::new(&text);
    let run = with_limit(&p, "256MiB", &["run", "p.toml"]);
    assert_eq!(run.code, 4, "{}{}", run.stdout, run.stderr);
    let first = run
        .stderr
        .find("lower `lora.rank` (now 100000)")
        .unwrap_or_else(|| panic!("no rank advice:\n{}", run.stderr));
    let batch = run.stderr.find("lower `batch_size`").unwrap();
    assert!(first < batch, "rank advice comes first:\n{}", run.stderr);
}
