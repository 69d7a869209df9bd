//! `sdpipe device-check` through the real binary: the CPU-only comparison (fused CPU kernels
//! against dfdx's generic op path, which is what a CUDA device runs) on the tiny fixture model,
//! the `--json` report, and the documented exit code of a build without a GPU.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn sdpipe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdpipe"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cpu_only_check_compares_every_op_and_model_part() {
    let model = fixtures().join("tiny-sd");
    let out = sdpipe(&[
        "device-check",
        "--cpu-only",
        "--json",
        "--model",
        model.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["device"], "cpu-generic");
    assert_eq!(report["ok"], true);
    let rows = report["rows"].as_array().unwrap();
    let ops: Vec<&str> = rows.iter().map(|r| r["op"].as_str().unwrap()).collect();
    for want in [
        "matmul",
        "conv2d 3x3 s1",
        "conv2d 3x3 s2 grad",
        "group norm",
        "layer norm",
        "attention cross (chunk 8)",
        "attention grad (q)",
        "softmax",
        "upsample nearest 2x",
        "adamw 3 steps",
        "text encoder",
        "unet",
        "unet grad (sample)",
        "unet (f16)",
        "unet (f16) grad (sample)",
        "vae encode (mean)",
        "vae decode",
    ] {
        assert!(ops.contains(&want), "missing {want} in {ops:?}");
    }
    for r in rows {
        let rel = r["max_rel_err"].as_f64().unwrap();
        // f32 rows: 1e-4; the mixed-precision rows against the f32 truth: 1e-2, and really
        // rounded to f16 (not silently computed in f32)
        if r["op"].as_str().unwrap().contains("(f16)") {
            assert!(
                (r["tolerance"].as_f64().unwrap() - 1e-2).abs() < 1e-8,
                "{r}"
            );
            assert!(rel <= 1e-2 && rel > 1e-5, "{r}");
        } else {
            assert!(rel <= 1e-4, "{r}");
        }
    }
    // the two paths really differ somewhere (rounding), so the comparison is not vacuous
    assert!(
        rows.iter()
            .any(|r| r["max_abs_err"].as_f64().unwrap() > 0.0)
    );
}

#[test]
fn table_output_and_missing_model() {
    let out = sdpipe(&[
        "device-check",
        "--cpu-only",
        "--model",
        "/nonexistent/model",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model"));
}

#[test]
fn without_cuda_there_is_no_gpu_to_compare() {
    if sdpipe::device::cuda_available() {
        return; // a CUDA build: exit 4 only when no device opens, tested on the GPU machine
    }
    let out = sdpipe(&["device-check"]);
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no GPU to compare"), "{stderr}");
    assert!(stderr.contains("--cpu-only"), "{stderr}");
}

#[test]
fn device_option_is_checked_against_the_build() {
    if sdpipe::device::cuda_available() {
        return;
    }
    let model = fixtures().join("tiny-sd");
    let out = sdpipe(&[
        "sample",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "p",
        "--out",
        "never-written.png",
        "--device",
        "cuda:0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--device"));
    let out = sdpipe(&["plan", "nonexistent.toml", "--device", "cuda:1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cuda:1"));
}
