//! `sdpipe sample` driven through the real binary on the tiny fixture model: the 4-step DDIM
//! golden through `--init-latents` / `--out-tensor`, the PNG `parameters` chunk, batches, and
//! the usage errors.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::SafeTensors;
use sdpipe::render::read_parameters;
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn sdpipe(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_sdpipe"))
        .args(args)
        .current_dir(dir)
        .env("SDPIPE_CACHE_DIR", dir.join(".cache"))
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// An F32 tensor of a safetensors file: values and shape.
fn tensor(path: &Path, name: &str) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (v, t.shape().to_vec())
}

/// Writes the golden's `initial_latents` as `latents` in a safetensors file.
fn write_init_latents(path: &Path) {
    let (v, shape) = tensor(
        &fixtures().join("goldens/pipeline_ddim4.safetensors"),
        "initial_latents",
    );
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes).unwrap();
    std::fs::write(
        path,
        safetensors::serialize([("latents", view)], None).unwrap(),
    )
    .unwrap();
}

fn sha256_prefix(path: &Path) -> String {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .unwrap()
        .read_to_end(&mut bytes)
        .unwrap();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..10]
        .to_string()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() { f32::INFINITY } else { m.max(d) }
    })
}

fn golden_args<'a>(model: &'a str, latents: &'a str) -> Vec<&'a str> {
    vec![
        "sample",
        "--model",
        model,
        "--prompt",
        "a photo of sks dog",
        "--steps",
        "4",
        "--sampler",
        "ddim",
        "--cfg",
        "7.5",
        "--init-latents",
        latents,
    ]
}

#[test]
fn sample_reproduces_the_ddim_golden() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let latents = dir.join("latents.safetensors");
    write_init_latents(&latents);
    let model = fixtures().join("tiny-sd");
    let model_s = model.to_str().unwrap();
    let mut args = golden_args(model_s, latents.to_str().unwrap());
    args.extend([
        "--width",
        "16",
        "--height",
        "16",
        "--out",
        "out/img.png",
        "--out-tensor",
        "out/img.safetensors",
    ]);
    let run = sdpipe(dir, &args);
    assert_eq!(run.code, 0, "stderr: {}", run.stderr);
    assert!(run.stdout.contains("img.png"), "{}", run.stdout);

    let (image, shape) = tensor(&dir.join("out/img.safetensors"), "image");
    let (want, want_shape) = tensor(
        &fixtures().join("goldens/pipeline_ddim4.safetensors"),
        "image",
    );
    assert_eq!(shape, vec![1, 3, 16, 16]);
    assert_eq!(shape, want_shape);
    let err = max_abs_diff(&image, &want);
    println!(
        "sdpipe sample --out-tensor image vs diffusers: max abs error {err:.3e} (tolerance 1e-3)"
    );
    assert!(err <= 1e-3, "image error {err}");

    let png = dir.join("out/img.png");
    let decoded = image::open(&png).unwrap().to_rgb8();
    assert_eq!(decoded.dimensions(), (16, 16));
    let params = read_parameters(&png).unwrap().expect("parameters chunk");
    assert_eq!(params.prompt, "a photo of sks dog");
    assert_eq!(params.negative_prompt, "");
    assert_eq!(params.steps, 4);
    assert_eq!(params.sampler, "DDIM");
    assert_eq!(params.cfg_scale, 7.5);
    assert_eq!(params.seed, 0);
    assert_eq!((params.width, params.height), (16, 16));
    let unet = model.join("unet/diffusion_pytorch_model.safetensors");
    assert_eq!(params.model_hash, Some(sha256_prefix(&unet)));
    assert_eq!(params.model.as_deref(), Some("tiny-sd"));
}

#[test]
fn sample_from_the_single_file_with_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let latents = dir.join("latents.safetensors");
    write_init_latents(&latents);
    let file = fixtures().join("tiny-sd-single-file.safetensors");
    let config = fixtures().join("tiny-sd");
    let mut args = golden_args(file.to_str().unwrap(), latents.to_str().unwrap());
    args.extend([
        "--config",
        config.to_str().unwrap(),
        "--negative",
        "",
        "--out",
        "a.png",
        "--out-tensor",
        "a.safetensors",
    ]);
    let run = sdpipe(dir, &args);
    assert_eq!(run.code, 0, "stderr: {}", run.stderr);
    let (image, _) = tensor(&dir.join("a.safetensors"), "image");
    let (want, _) = tensor(
        &fixtures().join("goldens/pipeline_ddim4.safetensors"),
        "image",
    );
    let err = max_abs_diff(&image, &want);
    println!("sdpipe sample (single file) image vs diffusers: max abs error {err:.3e}");
    assert!(err <= 1e-3, "image error {err}");
    let params = read_parameters(dir.join("a.png")).unwrap().unwrap();
    assert_eq!(params.model_hash, Some(sha256_prefix(&file)));
    assert_eq!(params.model.as_deref(), Some("tiny-sd-single-file"));
}

#[test]
fn batch_writes_numbered_files_with_their_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = fixtures().join("tiny-sd");
    let run = sdpipe(
        dir,
        &[
            "sample",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a cat",
            "--negative",
            "blurry",
            "--steps",
            "3",
            "--seed",
            "41",
            "--batch",
            "2",
            "--clip-skip",
            "1",
            "--out",
            "cat.png",
            "--out-tensor",
            "cat.safetensors",
        ],
    );
    assert_eq!(run.code, 0, "stderr: {}", run.stderr);
    // defaults: euler_a, cfg 7.5, the model's native 16x16
    let (_, shape) = tensor(&dir.join("cat.safetensors"), "image");
    assert_eq!(shape, vec![2, 3, 16, 16]);
    for (file, seed) in [("cat.png", 41), ("cat-1.png", 42)] {
        let p = read_parameters(dir.join(file)).unwrap().unwrap();
        assert_eq!(p.seed, seed, "{file}");
        assert_eq!(p.sampler, "Euler a");
        assert_eq!(p.cfg_scale, 7.5);
        assert_eq!(p.negative_prompt, "blurry");
        assert_eq!((p.width, p.height), (16, 16));
        assert!(
            p.extra.iter().any(|(k, v)| k == "Clip skip" && v == "2"),
            "{:?}",
            p.extra
        );
    }
    assert!(!dir.join("cat-2.png").exists());
}

#[test]
fn width_not_a_multiple_of_8_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-sd");
    let run = sdpipe(
        tmp.path(),
        &[
            "sample",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
            "--width",
            "20",
            "--height",
            "16",
            "--out",
            "x.png",
        ],
    );
    assert_eq!(run.code, 2, "stderr: {}", run.stderr);
    assert!(run.stderr.contains("--width"), "{}", run.stderr);
    assert!(!tmp.path().join("x.png").exists());
}

#[test]
fn missing_model_is_a_usage_error_naming_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-model.safetensors");
    let run = sdpipe(
        tmp.path(),
        &[
            "sample",
            "--model",
            missing.to_str().unwrap(),
            "--prompt",
            "x",
            "--out",
            "x.png",
        ],
    );
    assert_eq!(run.code, 2, "stderr: {}", run.stderr);
    assert!(
        run.stderr.contains(missing.to_str().unwrap()),
        "{}",
        run.stderr
    );
}

#[test]
fn bad_init_latents_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let latents = dir.join("latents.safetensors");
    write_init_latents(&latents); // [1, 4, 8, 8]: a 16x16 image
    let model = fixtures().join("tiny-sd");
    let mut args = golden_args(model.to_str().unwrap(), latents.to_str().unwrap());
    args.extend(["--width", "24", "--out", "x.png"]);
    let run = sdpipe(dir, &args);
    assert_eq!(run.code, 2, "stderr: {}", run.stderr);
    assert!(run.stderr.contains("--init-latents"), "{}", run.stderr);
    // a file without a `latents` tensor
    let other = dir.join("other.safetensors");
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &[0u8; 4]).unwrap();
    std::fs::write(&other, safetensors::serialize([("x", view)], None).unwrap()).unwrap();
    let mut args = golden_args(model.to_str().unwrap(), other.to_str().unwrap());
    args.extend(["--out", "x.png"]);
    let run = sdpipe(dir, &args);
    assert_eq!(run.code, 2, "stderr: {}", run.stderr);
    assert!(
        run.stderr.contains("latents") && run.stderr.contains("other.safetensors"),
        "{}",
        run.stderr
    );
}

/// Warnings reach a log file or a CI capture as plain `WARN`, without terminal colour codes.
#[test]
fn warnings_on_a_redirected_stderr_carry_no_colour_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = fixtures().join("tiny-sd");
    let prompt = format!("{} tail end", "word ".repeat(80));
    let run = sdpipe(
        dir,
        &[
            "sample",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            &prompt,
            "--steps",
            "1",
            "--out",
            "long.png",
        ],
    );
    assert_eq!(run.code, 0, "stderr: {}", run.stderr);
    assert!(run.stderr.contains("WARN"), "{}", run.stderr);
    assert!(!run.stderr.contains('\x1b'), "{:?}", run.stderr);
}
