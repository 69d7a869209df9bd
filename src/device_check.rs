//! `sdpipe device-check`: runs every op family the diffusion core uses and every model part on a
//! device under test and on the CPU reference, and compares the results.
//!
//! ```text
//! sdpipe device-check [--model PATH] [--device cuda:N] [--cpu-only] [--tolerance F] [--json]
//! ```
//!
//! * Checks (forward, and the input gradient where training differentiates through it): matmul
//!   (dfdx `matmul` and the crate's `Linear`), the im2col convolution (stride 1 and 2, + input
//!   gradient), group norm (+ fused SiLU, + gradient), layer norm, chunked attention (cross and
//!   causal, + gradient), softmax, SiLU/GELU, nearest upsampling, three AdamW steps, and on the
//!   model at `--model` (default `tests/fixtures/tiny-sd`): text encoder, UNet (+ gradient of the
//!   sample), VAE encode (mean, std) and decode.
//! * Inputs are drawn on the host from fixed seeds and copied to both devices, so both sides
//!   compute the same function of the same numbers.
//! * Error measures, per output tensor with `r` the reference (CPU) values and `x` the device's:
//!   `max abs err = maxᵢ |xᵢ − rᵢ|`, and `max rel err = max abs err / maxᵢ |rᵢ|` (relative to the
//!   tensor's largest reference magnitude, so elements near zero do not blow it up). A row is ok
//!   when `max rel err ≤ tolerance` (default 1e-4, for f32) and every value is finite.
//! * The reference is dfdx's CPU device with the crate's fused host kernels (what CPU runs use).
//!   The device under test is CUDA device N (`--device`, default `cuda:0`). `--cpu-only` instead
//!   tests dfdx's generic op composition (the code path every non-CPU device takes) on the CPU:
//!   no GPU needed, it checks the comparison itself and the generic path.
//!
//! Exit codes: 0 every row ok; 1 some row exceeds the tolerance; 2 bad usage; 3 the model could
//! not be loaded; 4 no GPU to compare (a binary built without the `cuda` feature, or no CUDA
//! device could be opened) — use `--cpu-only` there.

use crate::exit::ExitCode;
use std::path::{Path, PathBuf};

use clap::Args;
use dfdx::prelude::*;

use crate::diffusion::checkpoint::Checkpoint;
use crate::diffusion::error::DiffusionError;
use crate::diffusion::nn::{
    Conv2d, GroupNorm, Half, LayerNorm, Linear, Padding2d, gelu, scaled_dot_product_attention,
    silu, upsample_nearest2x, with_generic_kernels,
};
use crate::diffusion::text_to_image::TextToImage;
use crate::train::optim::{AdamW, AdamWConfig};

/// Options of `sdpipe device-check`.
#[derive(Debug, Clone, Args)]
pub struct DeviceCheckArgs {
    /// The SD model whose parts are checked (diffusers folder or single file).
    #[arg(long, value_name = "PATH", default_value = "tests/fixtures/tiny-sd")]
    pub model: PathBuf,
    /// The CUDA device under test (`cuda:N`).
    #[arg(long, value_name = "DEVICE", default_value = "cuda:0")]
    pub device: crate::device::DeviceChoice,
    /// Compare dfdx's generic op composition against the fused CPU kernels, both on the CPU
    /// (needs no GPU).
    #[arg(long)]
    pub cpu_only: bool,
    /// Largest max relative error accepted.
    #[arg(long, value_name = "F", default_value_t = 1e-4)]
    pub tolerance: f32,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One computed output of one check: its name, shape and values.
#[derive(Debug, Clone)]
pub struct Output {
    /// What was computed (e.g. `conv2d 3x3 s1`).
    pub name: String,
    /// Its shape, as written in the table.
    pub shape: String,
    /// Its values in logical order.
    pub values: Vec<f32>,
    /// Its own relative-error tolerance (the f16 rows: [`HALF_TOLERANCE`]); `None`: the
    /// check's f32 tolerance.
    pub tolerance: Option<f32>,
}

/// Relative-error tolerance of the mixed-precision (`f16`) rows against the f32 reference:
/// f16 keeps 11 significant bits (relative rounding 4.9e-4 per stored value).
pub const HALF_TOLERANCE: f32 = 1e-2;

/// One row of the comparison table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// What was computed.
    pub op: String,
    /// Its shape.
    pub shape: String,
    /// `max |x − r|`.
    pub max_abs_err: f32,
    /// `max |x − r| / max |r|`.
    pub max_rel_err: f32,
    /// The tolerance this row is held to.
    pub tolerance: f32,
    /// Within tolerance and finite.
    pub ok: bool,
}

/// The whole comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// The device under test (`cuda:N`, or `cpu-generic`).
    pub device: String,
    /// The reference (`cpu`).
    pub reference: String,
    /// The relative-error tolerance.
    pub tolerance: f32,
    /// One row per output.
    pub rows: Vec<Row>,
    /// Every row ok.
    pub ok: bool,
    /// Seconds the device under test took for all checks (model loading included).
    pub device_seconds: f64,
}

/// Compares two runs of the same outputs (`got` on the device under test, `want` on the
/// reference) with the error measures of the module documentation.
pub fn compare(got: &[Output], want: &[Output], tolerance: f32) -> Vec<Row> {
    let mut rows = Vec::new();
    for (g, w) in got.iter().zip(want) {
        let (max_abs, max_rel, finite) = if g.values.len() != w.values.len() {
            (f32::INFINITY, f32::INFINITY, false)
        } else {
            let mut max_abs = 0f32;
            let mut max_ref = 0f32;
            let mut finite = true;
            for (x, r) in g.values.iter().zip(&w.values) {
                finite &= x.is_finite() && r.is_finite();
                max_abs = max_abs.max((x - r).abs());
                max_ref = max_ref.max(r.abs());
            }
            let rel = if max_abs == 0.0 {
                0.0
            } else {
                max_abs / max_ref.max(f32::MIN_POSITIVE)
            };
            (max_abs, rel, finite)
        };
        let tolerance = w.tolerance.unwrap_or(tolerance);
        rows.push(Row {
            op: w.name.clone(),
            shape: w.shape.clone(),
            max_abs_err: max_abs,
            max_rel_err: max_rel,
            tolerance,
            ok: finite && g.name == w.name && max_rel <= tolerance,
        });
    }
    if got.len() != want.len() {
        rows.push(Row {
            op: format!("output count ({} vs {})", got.len(), want.len()),
            shape: String::new(),
            max_abs_err: f32::INFINITY,
            max_rel_err: f32::INFINITY,
            tolerance,
            ok: false,
        });
    }
    rows
}

/// The comparison table, one line per row.
pub fn format_table(report: &Report) -> String {
    let mut s = format!(
        "device check: {} vs {} (f32 rows: max rel err ≤ {:.0e}, f16 rows ≤ {:.0e}; rel = \
         max|x−r| / max|r|)\n",
        report.device, report.reference, report.tolerance, HALF_TOLERANCE
    );
    s.push_str(&format!(
        "{:<30} {:<24} {:>12} {:>12}  ok\n",
        "op", "shape", "max abs err", "max rel err"
    ));
    for r in &report.rows {
        s.push_str(&format!(
            "{:<30} {:<24} {:>12.3e} {:>12.3e}  {}\n",
            r.op,
            r.shape,
            r.max_abs_err,
            r.max_rel_err,
            if r.ok { "ok" } else { "FAIL" }
        ));
    }
    let failed = report.rows.iter().filter(|r| !r.ok).count();
    s.push_str(&format!(
        "{} of {} ok ({:.1} s on {})\n",
        report.rows.len() - failed,
        report.rows.len(),
        report.device_seconds,
        report.device
    ));
    s
}

/// Deterministic standard-normal values (Box–Muller over a seeded ChaCha stream).
fn normal(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let u1: f32 = rng.random::<f32>().max(1e-7);
            let u2: f32 = rng.random::<f32>();
            scale * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}

fn shape_str(dims: &[usize]) -> String {
    let d: Vec<String> = dims.iter().map(usize::to_string).collect();
    format!("[{}]", d.join(","))
}

/// Collects outputs in a fixed order.
struct Outputs(Vec<Output>);

impl Outputs {
    fn push<S: Shape, D: Device<f32>>(&mut self, name: &str, t: &Tensor<S, f32, D>) {
        let dims = t.shape().concrete();
        let dims: Vec<usize> = (0..S::NUM_DIMS).map(|i| dims[i]).collect();
        self.0.push(Output {
            name: name.to_string(),
            shape: shape_str(&dims),
            values: t.as_vec(),
            tolerance: None,
        });
    }
}

impl Outputs {
    /// A mixed-precision output, held to [`HALF_TOLERANCE`].
    fn push_half<S: Shape, D: Device<f32>>(&mut self, name: &str, t: &Tensor<S, f32, D>) {
        self.push(name, t);
        if let Some(last) = self.0.last_mut() {
            last.tolerance = Some(HALF_TOLERANCE);
        }
    }
}

fn t1<D: Device<f32>>(dev: &D, seed: u64, n: usize, scale: f32) -> Tensor<(usize,), f32, D> {
    dev.tensor_from_vec(normal(seed, n, scale), (n,))
}

fn t2<D: Device<f32>>(dev: &D, seed: u64, s: (usize, usize)) -> Tensor<(usize, usize), f32, D> {
    dev.tensor_from_vec(normal(seed, s.0 * s.1, 1.0), s)
}

fn t3<D: Device<f32>>(
    dev: &D,
    seed: u64,
    s: (usize, usize, usize),
) -> Tensor<(usize, usize, usize), f32, D> {
    dev.tensor_from_vec(normal(seed, s.0 * s.1 * s.2, 1.0), s)
}

fn t4<D: Device<f32>>(
    dev: &D,
    seed: u64,
    s: (usize, usize, usize, usize),
    scale: f32,
) -> Tensor<(usize, usize, usize, usize), f32, D> {
    dev.tensor_from_vec(normal(seed, s.0 * s.1 * s.2 * s.3, scale), s)
}

/// The op-family checks on `dev` (see the module documentation).
pub fn op_outputs<D: Device<f32>>(dev: &D) -> Vec<Output> {
    let mut out = Outputs(Vec::new());

    // matmul: dfdx's, and the Linear layer (a fused host GEMM on the CPU)
    let a = t2(dev, 1, (64, 96));
    let b = t2(dev, 2, (96, 80));
    out.push("matmul", &a.clone().matmul(b));
    let linear = Linear {
        weight: t2(dev, 3, (48, 96)),
        bias: Some(t1(dev, 4, 48, 1.0)),
        lora: None,
        delta: None,
        trainable: false,
    };
    out.push("linear", &linear.forward(t3(dev, 5, (2, 64, 96))));

    // convolution (im2col + matmul), forward and input gradient
    for (stride, seed) in [(1usize, 10u64), (2, 20)] {
        let conv = Conv2d {
            weight: t4(dev, seed, (16, 8, 3, 3), 0.2),
            bias: Some(t1(dev, seed + 1, 16, 1.0)),
            stride,
            padding: Padding2d::same(1),
            lora: None,
            delta: None,
            trainable: false,
        };
        let x = t4(dev, seed + 2, (2, 8, 12, 10), 1.0);
        out.push(&format!("conv2d 3x3 s{stride}"), &conv.forward(x.clone()));
        let g = conv.forward(x.leaky_trace()).square().mean().backward();
        out.push(&format!("conv2d 3x3 s{stride} grad"), &g.get(&x));
    }
    let conv1 = Conv2d {
        weight: t4(dev, 30, (12, 16, 1, 1), 0.2),
        bias: None,
        stride: 1,
        padding: Padding2d::same(0),
        lora: None,
        delta: None,
        trainable: false,
    };
    out.push(
        "conv2d 1x1",
        &conv1.forward(t4(dev, 31, (2, 16, 6, 6), 1.0)),
    );

    // group norm (+ fused SiLU), forward and input gradient
    let gn = GroupNorm {
        weight: t1(dev, 40, 16, 1.0),
        bias: t1(dev, 41, 16, 1.0),
        num_groups: 4,
        eps: 1e-5,
        trainable: false,
    };
    let x = t4(dev, 42, (2, 16, 8, 6), 2.0);
    out.push("group norm", &gn.forward(x.clone()));
    out.push("group norm + silu", &gn.forward_silu(x.clone()));
    let g = gn.forward_silu(x.leaky_trace()).square().mean().backward();
    out.push("group norm + silu grad", &g.get(&x));

    // layer norm
    let ln = LayerNorm {
        weight: t1(dev, 50, 32, 1.0),
        bias: t1(dev, 51, 32, 1.0),
        eps: 1e-5,
        trainable: false,
    };
    let x = t3(dev, 52, (2, 10, 32));
    out.push("layer norm", &ln.forward(x.clone()));
    let g = ln.forward(x.leaky_trace()).square().mean().backward();
    out.push("layer norm grad", &g.get(&x));

    // attention: cross (n != m, chunked) and causal self-attention, + gradient of q
    let q = t4(dev, 60, (2, 2, 20, 16), 1.0);
    let k = t4(dev, 61, (2, 2, 7, 16), 1.0);
    let v = t4(dev, 62, (2, 2, 7, 8), 1.0);
    out.push(
        "attention cross (chunk 8)",
        &scaled_dot_product_attention(q.clone(), k.clone(), v.clone(), false, 8),
    );
    let kc = t4(dev, 63, (2, 2, 20, 16), 1.0);
    let vc = t4(dev, 64, (2, 2, 20, 8), 1.0);
    out.push(
        "attention causal",
        &scaled_dot_product_attention(q.clone(), kc, vc, true, 1024),
    );
    let g = scaled_dot_product_attention(q.leaky_trace(), k.retaped(), v.retaped(), false, 8)
        .square()
        .mean()
        .backward();
    out.push("attention grad (q)", &g.get(&q));

    // softmax, activations, upsampling
    out.push(
        "softmax",
        &(t2(dev, 70, (6, 50)) * 3.0).softmax::<Axis<1>>(),
    );
    let x = t4(dev, 71, (2, 4, 5, 6), 2.0);
    out.push("silu", &silu(x.clone()));
    out.push("gelu (erf)", &gelu(x.clone()));
    out.push("upsample nearest 2x", &upsample_nearest2x(x));

    // three AdamW steps on one parameter
    let mut opt = AdamW::new(dev, AdamWConfig::default());
    let mut p = t2(dev, 80, (33, 17));
    for step in 0..3u64 {
        let grad = t2(dev, 81 + step, (33, 17));
        if let Err(e) = opt.update("p", &mut p, &grad, 1e-2) {
            // shapes are fixed here; an error is a bug worth seeing in the table
            out.0.push(Output {
                name: format!("adamw step (error: {e})"),
                shape: String::new(),
                values: vec![f32::NAN],
                tolerance: None,
            });
        }
    }
    out.push("adamw 3 steps", &p);
    out.0
}

/// The model-part checks on the model at `model`, loaded on `dev`.
///
/// The `unet (f16)` rows run the UNet in mixed precision ([`Half`]); `reference` computes
/// them in f32 instead, so a device's f16 result is held against the f32 truth.
pub fn model_outputs<D: Device<f32> + Device<Half>>(
    dev: &D,
    model: &Path,
    reference: bool,
) -> Result<Vec<Output>, DiffusionError> {
    let ckpt = Checkpoint::open(model)?;
    let pipe = TextToImage::load(&ckpt, None, dev).map_err(|e| match e {
        crate::diffusion::text_to_image::TextToImageError::Model(m) => m,
        other => DiffusionError::Input {
            model: "device check",
            reason: other.to_string(),
        },
    })?;
    let mut out = Outputs(Vec::new());

    let text = pipe
        .encode_prompt("a photo of an astronaut riding a horse", 0)
        .map_err(|e| DiffusionError::Input {
            model: "text encoder",
            reason: e.to_string(),
        })?;
    out.push("text encoder", &text);

    let unet = &pipe.models.unet;
    let c = &unet.config;
    let factor = 1usize << (c.block_out_channels.len() - 1);
    let side = (2 * factor).max(8).div_ceil(factor) * factor;
    let sample = t4(dev, 100, (2, c.in_channels, side, side), 1.0);
    let context = t3(dev, 101, (2, 9, c.cross_attention_dim));
    let eps = unet.forward(sample.clone(), &[981.0, 1.0], context.clone())?;
    out.push("unet", &eps);
    let y = unet.forward(sample.leaky_trace(), &[500.0], context.retaped())?;
    let g = y.square().mean().backward();
    out.push("unet grad (sample)", &g.get(&sample));
    let ts = [981.0, 1.0];
    let (eps, grad) = if reference {
        let (value, tape) = unet
            .forward(sample.leaky_trace(), &ts, context.retaped())?
            .split_tape();
        let g = value.clone().put_tape(tape).square().mean().backward();
        (value, g.get(&sample))
    } else {
        let half = ckpt.load_unet_as::<Half, D>(dev)?;
        let s = sample.clone().to_dtype::<Half>();
        let c = context.clone().to_dtype::<Half>();
        let (value, tape) = half
            .forward(s.leaky_trace(), &ts, c.retaped())?
            .split_tape();
        let g = value.clone().put_tape(tape).square().mean().backward();
        (value.to_dtype::<f32>(), g.get(&s).to_dtype::<f32>())
    };
    out.push_half("unet (f16)", &eps);
    out.push_half("unet (f16) grad (sample)", &grad);

    let vae = &pipe.models.vae;
    let f = vae.config.downsampling_factor();
    let hw = 4 * f;
    let image = t4(dev, 110, (1, vae.config.in_channels, hw, hw), 0.5);
    let posterior = vae.encode(image)?;
    out.push("vae encode (mean)", &posterior.mean);
    out.push("vae encode (std)", &posterior.std);
    let latents = t4(dev, 111, (1, vae.config.latent_channels, 4, 4), 1.0);
    out.push("vae decode", &vae.decode(latents)?);
    Ok(out.0)
}

/// Every check on `dev`: the op families, then the model parts.
pub fn all_outputs<D: Device<f32> + Device<Half>>(
    dev: &D,
    model: &Path,
    reference: bool,
) -> Result<Vec<Output>, DiffusionError> {
    let mut out = op_outputs(dev);
    out.extend(model_outputs(dev, model, reference)?);
    Ok(out)
}

/// Runs every check on dfdx's generic op path on the CPU against the fused CPU kernels.
pub fn check_cpu_paths(model: &Path, tolerance: f32) -> Result<Report, DiffusionError> {
    let cpu = Cpu::default();
    let want = all_outputs(&cpu, model, true)?;
    let start = std::time::Instant::now();
    let got = with_generic_kernels(|| all_outputs(&cpu, model, false))?;
    Ok(report(
        "cpu-generic",
        &got,
        &want,
        tolerance,
        start.elapsed(),
    ))
}

/// Runs every check on `dev` against the CPU reference.
pub fn check_device<D: Device<f32> + Device<Half>>(
    name: &str,
    dev: &D,
    model: &Path,
    tolerance: f32,
) -> Result<Report, DiffusionError> {
    let start = std::time::Instant::now();
    let got = all_outputs(dev, model, false)?;
    let elapsed = start.elapsed();
    let want = all_outputs(&Cpu::default(), model, true)?;
    Ok(report(name, &got, &want, tolerance, elapsed))
}

fn report(
    device: &str,
    got: &[Output],
    want: &[Output],
    tolerance: f32,
    elapsed: std::time::Duration,
) -> Report {
    let rows = compare(got, want, tolerance);
    Report {
        device: device.to_string(),
        reference: "cpu".into(),
        tolerance,
        ok: rows.iter().all(|r| r.ok),
        rows,
        device_seconds: elapsed.as_secs_f64(),
    }
}

/// Runs `sdpipe device-check`; returns the exit code.
pub fn run(args: &DeviceCheckArgs) -> ExitCode {
    if args.tolerance.is_nan() || args.tolerance < 0.0 {
        eprintln!("error: --tolerance must be a non-negative number");
        return ExitCode::Usage;
    }
    let result = if args.cpu_only {
        check_cpu_paths(&args.model, args.tolerance)
    } else {
        let ordinal = match args.device {
            crate::device::DeviceChoice::Cuda(n) => n,
            _ => {
                eprintln!(
                    "error: --device must be cuda:N (the device under test; the reference is the CPU)"
                );
                return ExitCode::Usage;
            }
        };
        if !crate::device::cuda_available() {
            eprintln!(
                "device check: no GPU to compare: this binary was built without CUDA \
                 (build with scripts/build-cuda.sh); `--cpu-only` checks the generic op path on \
                 the CPU instead"
            );
            return ExitCode::Device;
        }
        let rt = match crate::device::open(crate::device::DeviceChoice::Cuda(ordinal)) {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("device check: no GPU to compare: {e}");
                return ExitCode::Device;
            }
        };
        let name = rt.name();
        crate::on_device!(rt, dev => check_device(&name, &dev, &args.model, args.tolerance))
    };
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: --model {}: {e}", args.model.display());
            return ExitCode::Environment;
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => crate::outln!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::Environment;
            }
        }
    } else {
        crate::out!("{}", format_table(&report));
    }
    if report.ok {
        ExitCode::Ok
    } else {
        ExitCode::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(name: &str, values: Vec<f32>) -> Output {
        Output {
            name: name.into(),
            shape: String::new(),
            values,
            tolerance: None,
        }
    }

    #[test]
    fn relative_error_is_against_the_largest_reference_value() {
        // an error of 5e-4 next to a zero is fine when the tensor's scale is 10
        let rows = compare(
            &[out("a", vec![10.0, 0.0005])],
            &[out("a", vec![10.0, 0.0])],
            1e-4,
        );
        assert_eq!(rows[0].max_abs_err, 0.0005);
        assert!((rows[0].max_rel_err - 5e-5).abs() < 1e-9);
        assert!(rows[0].ok);
        let rows = compare(
            &[out("a", vec![10.0, 0.01])],
            &[out("a", vec![10.0, 0.0])],
            1e-4,
        );
        assert!(!rows[0].ok);
    }

    #[test]
    fn non_finite_and_missing_outputs_fail() {
        let rows = compare(&[out("a", vec![f32::NAN])], &[out("a", vec![1.0])], 1e-4);
        assert!(!rows[0].ok);
        let rows = compare(&[], &[out("a", vec![1.0])], 1e-4);
        assert!(!rows.last().unwrap().ok);
        let rows = compare(&[out("a", vec![1.0, 2.0])], &[out("a", vec![1.0])], 1e-4);
        assert!(!rows[0].ok);
    }

    #[test]
    fn zero_reference_and_equal_values_are_ok() {
        let rows = compare(&[out("z", vec![0.0; 4])], &[out("z", vec![0.0; 4])], 0.0);
        assert!(rows[0].ok);
        assert_eq!(rows[0].max_rel_err, 0.0);
    }

    #[test]
    fn generic_ops_match_the_fused_cpu_kernels() {
        let cpu = Cpu::default();
        let want = op_outputs(&cpu);
        let got = with_generic_kernels(|| op_outputs(&cpu));
        let rows = compare(&got, &want, 1e-4);
        for r in &rows {
            println!(
                "{:<28} {:<16} abs {:.3e} rel {:.3e}",
                r.op, r.shape, r.max_abs_err, r.max_rel_err
            );
        }
        assert!(rows.iter().all(|r| r.ok), "{rows:#?}");
        // the switch really selects another path: some op differs in rounding
        assert!(rows.iter().any(|r| r.max_abs_err > 0.0));
    }
}
