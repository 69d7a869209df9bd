//! `sdpipe bench` through the real binary on the tiny fixture model: every task prints a
//! well-formed JSON object with positive figures (no timing thresholds), the table, and the
//! usage errors.

use std::path::Path;
use std::process::Command;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn sdpipe(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_sdpipe"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn bench_json(task: &str, batch: &str) -> serde_json::Value {
    let run = sdpipe(&[
        "--quiet",
        "bench",
        "--task",
        task,
        "--arch",
        "tiny",
        "--batch",
        batch,
        "--resolution",
        "32",
        "--iters",
        "2",
        "--warmup",
        "1",
        "--json",
    ]);
    assert_eq!(run.code, 0, "{task}: {}{}", run.stdout, run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{task}: one JSON line, got {}", run.stdout);
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{task}: {e}: {}", run.stdout))
}

fn positive(v: &serde_json::Value, field: &str) -> f64 {
    let x = v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} missing in {v}"));
    assert!(x > 0.0 && x.is_finite(), "{field} = {x} in {v}");
    x
}

#[test]
fn every_task_reports_positive_figures() {
    let tasks = [
        ("lora-train", "lora_train_bs2", "samples/s", true),
        ("full-train", "full_train_bs2", "samples/s", true),
        ("ti-train", "ti_train_bs2", "samples/s", true),
        ("unet-forward", "unet_forward_bs2", "samples/s", false),
        ("sample-step", "unet_cfg_step_bs2", "it/s", false),
        ("vae-encode", "vae_encode_32_bs2", "images/s", false),
    ];
    for (task, key, unit, trains) in tasks {
        let v = bench_json(task, "2");
        assert_eq!(v["task"], task);
        assert_eq!(v["arch"], "tiny");
        assert_eq!(v["batch"], 2);
        assert_eq!(v["resolution"], 32);
        assert_eq!(v["latent_size"], 16, "the tiny VAE downsamples by 2");
        assert_eq!(v["iters"], 2);
        assert_eq!(v["device"], "cpu");
        assert_eq!(v["precision"], "f32");
        assert_eq!(v["sdpipe_version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(v["key"], key);
        assert_eq!(v["unit"], unit);
        positive(&v, "value");
        let min = v["step_ms"]["min"].as_f64().unwrap();
        let median = v["step_ms"]["median"].as_f64().unwrap();
        let mean = v["step_ms"]["mean"].as_f64().unwrap();
        assert!(0.0 < min && min <= median && min <= mean, "{v}");
        positive(&v, "peakmem_gib");
        positive(&v, "peak_memory_bytes");
        assert!(
            v["memory_source"].as_str().unwrap().contains("VmHWM"),
            "{v}"
        );
        positive(&v, "model_params");
        if trains {
            positive(&v, "trainable_params");
            positive(&v, "last_loss");
        } else {
            assert_eq!(v["trainable_params"], 0);
        }
    }
}

#[test]
fn lora_rank_sets_the_trained_parameters() {
    let v4 = bench_json("lora-train", "1");
    assert_eq!(v4["rank"], 16);
    let run = sdpipe(&[
        "--quiet",
        "bench",
        "--task",
        "lora-train",
        "--arch",
        "tiny",
        "--resolution",
        "16",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--rank",
        "4",
        "--json",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(
        v4["trainable_params"].as_u64().unwrap(),
        4 * v["trainable_params"].as_u64().unwrap()
    );
}

#[test]
fn the_table_names_every_figure() {
    let run = sdpipe(&[
        "bench",
        "--task",
        "unet-forward",
        "--arch",
        "tiny",
        "--resolution",
        "16",
        "--iters",
        "2",
        "--warmup",
        "0",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for word in [
        "step ms",
        "median",
        "samples/s",
        "peak memory",
        "VmHWM",
        "cpu",
    ] {
        assert!(run.stdout.contains(word), "{word} missing:\n{}", run.stdout);
    }
}

#[test]
fn a_path_arch_opens_the_checkpoint() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd");
    let run = sdpipe(&[
        "--quiet",
        "bench",
        "--task",
        "vae-encode",
        "--arch",
        dir.to_str().unwrap(),
        "--resolution",
        "16",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert!(v["arch"].as_str().unwrap().ends_with("tiny-sd"));
    assert!(v["value"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_options_are_usage_errors() {
    let base = ["bench", "--arch", "tiny", "--iters", "1", "--warmup", "0"];
    let with = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        sdpipe(&args)
    };
    let run = with(&["--task", "unet-forward", "--resolution", "20"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("--resolution 20") && run.stderr.contains("multiple of 8"),
        "{}",
        run.stderr
    );
    let run = with(&["--task", "unet-backward", "--resolution", "16"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("lora-train"), "{}", run.stderr);
    let run = with(&["--task", "lora-train", "--batch", "0", "--resolution", "16"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("--batch must be positive"),
        "{}",
        run.stderr
    );
    let run = sdpipe(&[
        "bench",
        "--task",
        "unet-forward",
        "--arch",
        "/no/such/model",
        "--iters",
        "1",
    ]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("/no/such/model"), "{}", run.stderr);
}
