//! Fused CPU kernels with hand-written backward passes.
//!
//! dfdx builds every layer from many small ops (a softmax is five, a GroupNorm about ten), each
//! allocating its output and, under a tape, its gradient; and its matmul backward also computes
//! the gradient of the (frozen) weight. On the tiny and mid-sized tensors of the SD models that
//! overhead dominates. The functions here compute a whole layer on the host in one pass and
//! register one backward op on the tape that gives the gradient of the *activations* only:
//! the model parameters are frozen (plain, un-taped tensors; see the crate's training design),
//! so no gradient is computed for them on this path.
//!
//! Only the [`Cpu`] device takes these paths ([`is_cpu`]); the layers keep their generic dfdx
//! composition for other devices.

use dfdx::prelude::*;

/// Whether `D` is dfdx's CPU device (whose storage is a host `Vec<f32>`) and the fused host
/// kernels are on for this thread (see [`with_generic_kernels`]).
pub(crate) fn is_cpu<D: 'static>() -> bool {
    std::any::TypeId::of::<D>() == std::any::TypeId::of::<Cpu>()
        && !GENERIC_ONLY.with(std::cell::Cell::get)
}

thread_local! {
    static GENERIC_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the fused host kernels switched off on this thread, so the layers take the
/// generic dfdx composition every other device (CUDA) runs, on the CPU. The device check uses
/// it to test its comparison without a GPU; results agree with the fused path to rounding.
pub fn with_generic_kernels<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GENERIC_ONLY.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GENERIC_ONLY.with(|g| g.replace(true)));
    f()
}

/// The values of `t` in logical order (a memcpy of a contiguous tensor's storage; dfdx's
/// `as_vec` walks the strides element by element).
pub(crate) fn host_vec<S: Shape, D: Device<f32>>(t: &Tensor<S, f32, D>) -> Vec<f32> {
    let t = t.clone().contiguous();
    let mut v = vec![0f32; t.shape().num_elements()];
    t.copy_into(&mut v);
    v
}

/// `e^x` for f32 without a libm call, so loops over it vectorise: `2^n · p(r)` with
/// `x = n ln 2 + r`, `|r| <= ln 2 / 2` and `p` the degree-7 Taylor polynomial (relative error
/// below 2e-7). Inputs are clamped to [-87, 88] (results there are within f32's normal range).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    // 2^n from the integer in `t`'s mantissa: (n + 127) << 23
    let bits = t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23;
    p * f32::from_bits(bits)
}

/// Sum with eight partial sums (vectorises; f32 addition order otherwise forbids it).
#[inline]
pub(crate) fn sum_f32(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// Maximum with eight partial maxima (vectorises); `-inf` for an empty slice.
#[inline]
pub(crate) fn max_f32(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter()
        .chain(rest)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `erf(x)` for f32 (Abramowitz & Stegun 7.1.26, absolute error below 2e-7), branch-free
/// apart from the sign so loops over it vectorise.
#[inline(always)]
pub(crate) fn erf_f32(x: f32) -> f32 {
    let ax = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * ax);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * exp_f32(-ax * ax)).copysign(x)
}

/// Dot product with eight partial sums.
#[inline]
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// The host slice behind a CPU gradient buffer.
pub(crate) fn cpu_grad(v: &mut dyn std::any::Any) -> &mut [f32] {
    v.downcast_mut::<<Cpu as Storage<f32>>::Vec>()
        .expect("host kernels only run on the Cpu device")
}

/// Backward of a one-input host op: gets the output gradient, adds the input gradient.
pub(crate) type Backward1 = Box<dyn FnOnce(&[f32], &mut [f32])>;
/// Backward of a three-input host op: gets the output gradient, returns the three input
/// gradients (to be added).
pub(crate) type Backward3 = Box<dyn FnOnce(&[f32]) -> [Vec<f32>; 3]>;

/// Runs `op` on the host values of `x` (logical order) and returns its output as a tensor of
/// `shape`, carrying `x`'s tape; the backward closure `op` returns is recorded on the tape (and
/// dropped without a tape).
pub(crate) fn host_op<Si: Shape, So: Shape, D: Device<f32>, T: Tape<f32, D>>(
    x: Tensor<Si, f32, D, T>,
    shape: So,
    op: impl FnOnce(Vec<f32>) -> (Vec<f32>, Backward1),
) -> Tensor<So, f32, D, T> {
    host_op_params(x, shape, Vec::new(), move |xv| {
        let (y, backward) = op(xv);
        let backward: BackwardP = Box::new(move |gy, gx| {
            backward(gy, gx);
            Vec::new()
        });
        (y, backward)
    })
}

/// Backward of a host op with trained parameters: gets the output gradient, adds the input
/// gradient, and returns the gradients of the parameters (in the order they were given).
pub(crate) type BackwardP = Box<dyn FnOnce(&[f32], &mut [f32]) -> Vec<Vec<f32>>>;

/// [`host_op`] for a layer whose parameters train: `params` are flat views of them (a
/// contiguous reshape keeps the tensor's id, so `grads.get(&layer.weight)` finds the
/// gradient), and the backward's returned gradients are added to theirs. Without a tape the
/// parameters are ignored.
pub(crate) fn host_op_params<Si: Shape, So: Shape, D: Device<f32>, T: Tape<f32, D>>(
    x: Tensor<Si, f32, D, T>,
    shape: So,
    params: Vec<Tensor<(usize,), f32, D>>,
    op: impl FnOnce(Vec<f32>) -> (Vec<f32>, BackwardP),
) -> Tensor<So, f32, D, T> {
    // the gradient buffer is indexed like the data: work on a contiguous input
    let (x, mut tape) = x.contiguous().split_tape();
    let dev = x.device().clone();
    let (y, backward) = op(host_vec(&x));
    debug_assert_eq!(y.len(), shape.num_elements());
    let y = dev.tensor_from_vec(y, shape);
    if T::OWNS_TAPE {
        let y_ghost = y.clone();
        tape.add_backward_op(move |grads| {
            let gy = cpu_grad(grads.get_or_alloc_mut(&y_ghost)?).to_vec();
            let param_grads = backward(&gy, cpu_grad(grads.get_or_alloc_mut(&x)?));
            for (p, g) in params.iter().zip(param_grads) {
                for (d, v) in cpu_grad(grads.get_or_alloc_mut(p)?).iter_mut().zip(&g) {
                    *d += v;
                }
            }
            Ok(())
        });
    }
    y.put_tape(tape)
}

/// A flat view of a contiguous parameter (same id, so gradients land under the parameter).
pub(crate) fn flat<S: Shape, D: Device<f32>>(t: &Tensor<S, f32, D>) -> Tensor<(usize,), f32, D> {
    let n = t.shape().num_elements();
    t.clone().reshape_like(&(n,))
}

/// [`host_op`] with three inputs of one shape type (their tapes are merged).
pub(crate) fn host_op3<Si: Shape, So: Shape, D: Device<f32>, T: Tape<f32, D>>(
    inputs: [Tensor<Si, f32, D, T>; 3],
    shape: So,
    op: impl FnOnce([Vec<f32>; 3]) -> (Vec<f32>, Backward3),
) -> Tensor<So, f32, D, T> {
    let [a, b, c] = inputs;
    let (a, ta) = a.contiguous().split_tape();
    let (b, tb) = b.contiguous().split_tape();
    let (c, tc) = c.contiguous().split_tape();
    let mut tape = ta.merge(tb).merge(tc);
    let dev = a.device().clone();
    let (y, backward) = op([host_vec(&a), host_vec(&b), host_vec(&c)]);
    debug_assert_eq!(y.len(), shape.num_elements());
    let y = dev.tensor_from_vec(y, shape);
    if T::OWNS_TAPE {
        let y_ghost = y.clone();
        tape.add_backward_op(move |grads| {
            let gy = cpu_grad(grads.get_or_alloc_mut(&y_ghost)?).to_vec();
            let gs = backward(&gy);
            for (t, g) in [&a, &b, &c].into_iter().zip(gs) {
                for (d, v) in cpu_grad(grads.get_or_alloc_mut(t)?).iter_mut().zip(&g) {
                    *d += v;
                }
            }
            Ok(())
        });
    }
    y.put_tape(tape)
}

/// Multiply-adds (`m·n·k`) from which a product is split over rayon's threads. Below it the
/// hand-off costs more than it saves (measured on the tiny UNet: 2 threads on 2 shared cores
/// were ~20% slower than 1 with gemm's own threshold of 48·48·256).
const PARALLEL_GEMM_WORK: usize = 1 << 22;

/// Row-major single-precision matrix product on the host:
/// `c[m, n] (+)= a[m, k] · b[k, n]`, where element `(i, p)` of `a` is `a[i*a_rs + p*a_cs]`,
/// element `(p, j)` of `b` is `b[p*b_rs + j*b_cs]` and row `i` of `c` starts at `c[i*ldc]`.
/// With `accumulate` the product is added to `c`, otherwise `c` is overwritten.
///
/// Panics if a slice is too short for the given dimensions and strides.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    dims: (usize, usize, usize),
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    sgemm_scaled(dims, a, a_strides, b, b_strides, c, ldc, accumulate, 1.0);
}

/// [`sgemm`] with the product scaled by `scale`: `c (+)= scale · a · b`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_scaled(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        ldc >= n && c.len() >= (m - 1) * ldc + n,
        "sgemm: c too short"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        a.len() > (m - 1) * a_rs + (k - 1) * a_cs,
        "sgemm: a too short"
    );
    assert!(
        b.len() > (k - 1) * b_rs + (n - 1) * b_cs,
        "sgemm: b too short"
    );
    // SAFETY: the asserts above keep every accessed element inside the slices; `c` is
    // borrowed mutably and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            if m * n * k >= PARALLEL_GEMM_WORK {
                gemm::Parallelism::Rayon(0)
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

/// Layout of a normalisation: `groups` contiguous groups of `len` values each; value `i` of
/// group `g` uses affine channel `(g % groups_per_item) * channels_per_group + i / inner`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NormLayout {
    /// Number of normalised groups in the tensor.
    pub groups: usize,
    /// Values per group.
    pub len: usize,
    /// Groups per batch item (GroupNorm's `num_groups`; 1 for LayerNorm rows).
    pub groups_per_item: usize,
    /// Channels per group (`c / num_groups`; the row width for LayerNorm).
    pub channels_per_group: usize,
    /// Consecutive values sharing a channel (`h*w`; 1 for LayerNorm).
    pub inner: usize,
}

impl NormLayout {
    /// `v` (per channel) expanded to one value per position of each of the
    /// `groups_per_item` group patterns: `[groups_per_item, len]`.
    fn expand(&self, v: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.groups_per_item * self.len);
        for g in 0..self.groups_per_item {
            for i in 0..self.len {
                out.push(v[g * self.channels_per_group + i / self.inner]);
            }
        }
        out
    }
}

/// Fused normalisation (`(x - mean) / sqrt(var + eps)` per group, biased variance), affine
/// transform, and optionally SiLU, with the input gradient as backward; with `trained` (the
/// gamma and beta tensors) their gradients too.
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_affine<S: Shape, D: Device<f32>, T: Tape<f32, D>>(
    x: Tensor<S, f32, D, T>,
    layout: NormLayout,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f64,
    silu: bool,
    trained: Option<[Tensor<(usize,), f32, D>; 2]>,
) -> Tensor<S, f32, D, T> {
    let shape = *x.shape();
    assert_eq!(layout.groups * layout.len, shape.num_elements());
    let l = layout;
    let channels = gamma.len();
    // per-position affine factors of each group pattern
    let (gamma, beta) = (l.expand(&gamma), l.expand(&beta));
    let pattern =
        move |g: usize| (g % l.groups_per_item) * l.len..(g % l.groups_per_item + 1) * l.len;
    let train = trained.is_some();
    let params = trained.map(Vec::from).unwrap_or_default();
    host_op_params(x, shape, params, move |xv| {
        let mut y = vec![0f32; xv.len()];
        let mut stats = Vec::with_capacity(l.groups);
        for g in 0..l.groups {
            let xs = &xv[g * l.len..(g + 1) * l.len];
            let mean = xs.iter().map(|v| *v as f64).sum::<f64>() / l.len as f64;
            let var = xs.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / l.len as f64;
            let (mean, rstd) = (mean as f32, (1.0 / (var + eps).sqrt()) as f32);
            stats.push((mean, rstd));
            let ys = &mut y[g * l.len..(g + 1) * l.len];
            let (gs, bs) = (&gamma[pattern(g)], &beta[pattern(g)]);
            for (((o, v), ga), be) in ys.iter_mut().zip(xs).zip(gs).zip(bs) {
                *o = (v - mean) * rstd * ga + be;
            }
            if silu {
                for o in ys.iter_mut() {
                    *o /= 1.0 + exp_f32(-*o);
                }
            }
        }
        let backward: BackwardP = Box::new(move |gy, gx| {
            let n = l.len as f32;
            let mut gxh = vec![0f32; l.len];
            let mut xh = vec![0f32; l.len];
            // d loss / d (affine output) summed per pattern position: [groups_per_item * len]
            let (mut gg, mut gb) = if train {
                (vec![0f32; gamma.len()], vec![0f32; gamma.len()])
            } else {
                (Vec::new(), Vec::new())
            };
            for (g, &(mean, rstd)) in stats.iter().enumerate() {
                let xs = &xv[g * l.len..(g + 1) * l.len];
                let gys = &gy[g * l.len..(g + 1) * l.len];
                let (gs, bs) = (&gamma[pattern(g)], &beta[pattern(g)]);
                for (h, v) in xh.iter_mut().zip(xs) {
                    *h = (v - mean) * rstd;
                }
                if silu {
                    for ((((d, h), gyv), ga), be) in
                        gxh.iter_mut().zip(&xh).zip(gys).zip(gs).zip(bs)
                    {
                        let a = h * ga + be;
                        let s = 1.0 / (1.0 + exp_f32(-a));
                        *d = gyv * s * (1.0 + a * (1.0 - s)) * ga;
                    }
                } else {
                    for ((d, gyv), ga) in gxh.iter_mut().zip(gys).zip(gs) {
                        *d = gyv * ga;
                    }
                }
                if train {
                    // gxh = da · gamma, so da = gxh / gamma would lose zeros: recompute da
                    let r = pattern(g);
                    for (i, (h, gyv)) in xh.iter().zip(gys).enumerate() {
                        let da = if silu {
                            let a = h * gs[i] + bs[i];
                            let s = 1.0 / (1.0 + exp_f32(-a));
                            gyv * s * (1.0 + a * (1.0 - s))
                        } else {
                            *gyv
                        };
                        gg[r.start + i] += da * h;
                        gb[r.start + i] += da;
                    }
                }
                let m1 = sum_f32(&gxh) / n;
                let m2 = dot_f32(&gxh, &xh) / n;
                let gxs = &mut gx[g * l.len..(g + 1) * l.len];
                for ((o, d), h) in gxs.iter_mut().zip(&gxh).zip(&xh) {
                    *o += rstd * (d - m1 - h * m2);
                }
            }
            if !train {
                return Vec::new();
            }
            // pattern positions -> channels
            let (mut dgamma, mut dbeta) = (vec![0f32; channels], vec![0f32; channels]);
            for gp in 0..l.groups_per_item {
                for i in 0..l.len {
                    let c = gp * l.channels_per_group + i / l.inner;
                    dgamma[c] += gg[gp * l.len + i];
                    dbeta[c] += gb[gp * l.len + i];
                }
            }
            vec![dgamma, dbeta]
        });
        (y, backward)
    })
}

/// `x · Wᵀ + b` for `x: [m, in]`, `W: [out, in]`, with the input gradient as backward; with
/// `trained` (flat views of the weight and the bias) their gradients too.
pub(crate) fn linear<D: Device<f32>, T: Tape<f32, D>>(
    x: Tensor<(usize, usize), f32, D, T>,
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    out: usize,
    trained: Vec<Tensor<(usize,), f32, D>>,
) -> Tensor<(usize, usize), f32, D, T> {
    let (m, inp) = *x.shape();
    let train = !trained.is_empty();
    let has_bias = bias.is_some();
    host_op_params(x, (m, out), trained, move |xv| {
        let mut y = vec![0f32; m * out];
        if let Some(b) = &bias {
            for row in y.chunks_exact_mut(out) {
                row.copy_from_slice(b);
            }
        }
        sgemm(
            (m, out, inp),
            &xv,
            (inp, 1),
            &weight,
            (1, inp),
            &mut y,
            out,
            bias.is_some(),
        );
        // the weight gradient needs the input; otherwise do not keep it
        let xv = if train { xv } else { Vec::new() };
        let backward: BackwardP = Box::new(move |gy, gx| {
            // gx[m, in] += gy[m, out] · W[out, in]
            sgemm(
                (m, inp, out),
                gy,
                (out, 1),
                &weight,
                (inp, 1),
                gx,
                inp,
                true,
            );
            if !train {
                return Vec::new();
            }
            // gW[out, in] = gyᵀ[out, m] · x[m, in]
            let mut gw = vec![0f32; out * inp];
            sgemm(
                (out, inp, m),
                gy,
                (1, out),
                &xv,
                (inp, 1),
                &mut gw,
                inp,
                false,
            );
            let mut grads = vec![gw];
            if has_bias {
                let mut gb = vec![0f32; out];
                for row in gy.chunks_exact(out) {
                    gb.iter_mut().zip(row).for_each(|(a, b)| *a += b);
                }
                grads.push(gb);
            }
            grads
        });
        (y, backward)
    })
}

/// GEGLU's gate: `[.., 2F] -> [.., F]`, `h[.., :F] * gelu(h[.., F:])` (erf GELU).
pub(crate) fn geglu<D: Device<f32>, T: Tape<f32, D>>(
    h: Tensor<(usize, usize, usize), f32, D, T>,
) -> Tensor<(usize, usize, usize), f32, D, T> {
    let (b, n, f2) = *h.shape();
    let f = f2 / 2;
    const INV_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    let inv_sqrt_2pi = 1.0 / (2.0 * std::f32::consts::PI).sqrt();
    host_op(h, (b, n, f), move |hv| {
        let mut y = vec![0f32; b * n * f];
        for (row, out) in hv.chunks_exact(f2).zip(y.chunks_exact_mut(f)) {
            let (a, g) = row.split_at(f);
            for ((o, a), g) in out.iter_mut().zip(a).zip(g) {
                *o = a * 0.5 * g * (1.0 + erf_f32(g * INV_SQRT_2));
            }
        }
        let backward: Backward1 = Box::new(move |gy, gh| {
            for ((row, grow), gyr) in hv
                .chunks_exact(f2)
                .zip(gh.chunks_exact_mut(f2))
                .zip(gy.chunks_exact(f))
            {
                let (a, g) = row.split_at(f);
                let (ga, gg) = grow.split_at_mut(f);
                for j in 0..f {
                    let cdf = 0.5 * (1.0 + erf_f32(g[j] * INV_SQRT_2));
                    let pdf = (-0.5 * g[j] * g[j]).exp() * inv_sqrt_2pi;
                    ga[j] += gyr[j] * g[j] * cdf;
                    gg[j] += gyr[j] * a[j] * (cdf + g[j] * pdf);
                }
            }
        });
        (y, backward)
    })
}

/// Softmax of each row of `s: [rows, m]` in place; `mask_from(i)` gives the first masked
/// column of row `i` (`m` for none).
fn softmax_rows(s: &mut [f32], m: usize, mask_from: impl Fn(usize) -> usize) {
    for (i, row) in s.chunks_exact_mut(m).enumerate() {
        let end = mask_from(i).min(m);
        let (live, masked) = row.split_at_mut(end);
        masked.fill(0.0);
        let max = max_f32(live);
        for v in live.iter_mut() {
            *v = exp_f32(*v - max);
        }
        let inv = 1.0 / sum_f32(live);
        for v in live.iter_mut() {
            *v *= inv;
        }
    }
}

/// Largest attention probability matrix (elements, all heads and queries, 256 MiB of f32)
/// kept from the forward for the backward; bigger ones are recomputed chunk by chunk.
const MAX_KEPT_PROBS: usize = 1 << 26;

/// `softmax(q kᵀ · scale [+ causal mask]) v` per batch-head for contiguous `q: [bh, n, d]`,
/// `k: [bh, m, d]`, `v: [bh, m, dv]`, `chunk` queries at a time (the score matrix held is
/// `[chunk, m]`). Under a tape the probabilities are kept for the backward up to
/// `MAX_KEPT_PROBS` elements; above that the backward recomputes each chunk's, so memory
/// stays bounded with a tape too.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention<D: Device<f32>, T: Tape<f32, D>>(
    q: Tensor<(usize, usize, usize, usize), f32, D, T>,
    k: Tensor<(usize, usize, usize, usize), f32, D, T>,
    v: Tensor<(usize, usize, usize, usize), f32, D, T>,
    causal: bool,
    chunk: usize,
    scale: f32,
) -> Tensor<(usize, usize, usize, usize), f32, D, T> {
    attention_with(q, k, v, causal, chunk, scale, MAX_KEPT_PROBS)
}

/// [`attention`] keeping at most `max_kept` probabilities for the backward.
#[allow(clippy::too_many_arguments)]
fn attention_with<D: Device<f32>, T: Tape<f32, D>>(
    q: Tensor<(usize, usize, usize, usize), f32, D, T>,
    k: Tensor<(usize, usize, usize, usize), f32, D, T>,
    v: Tensor<(usize, usize, usize, usize), f32, D, T>,
    causal: bool,
    chunk: usize,
    scale: f32,
    max_kept: usize,
) -> Tensor<(usize, usize, usize, usize), f32, D, T> {
    let (b, h, n, d) = *q.shape();
    let m = k.shape().2;
    let dv = v.shape().3;
    let bh = b * h;
    let chunk = chunk.clamp(1, n.max(1));
    // scores of query rows `start..start+c` of head `x`, softmaxed, into `p[c, m]`
    let probs = move |qv: &[f32], kv: &[f32], x: usize, start: usize, c: usize, p: &mut [f32]| {
        let qs = &qv[(x * n + start) * d..];
        let ks = &kv[x * m * d..];
        sgemm_scaled((c, m, d), qs, (d, 1), ks, (1, d), p, m, false, scale);
        softmax_rows(
            &mut p[..c * m],
            m,
            |i| {
                if causal { start + i + 1 } else { m }
            },
        );
    };
    // under a tape, keep the probabilities for the backward when they are small enough
    let keep = T::OWNS_TAPE && bh * n * m <= max_kept;
    host_op3([q, k, v], (b, h, n, dv), move |[qv, kv, vv]| {
        let mut out = vec![0f32; bh * n * dv];
        let mut p = vec![0f32; if keep { 0 } else { chunk * m }];
        let mut kept = vec![0f32; if keep { bh * n * m } else { 0 }];
        for x in 0..bh {
            let mut start = 0;
            while start < n {
                let c = chunk.min(n - start);
                let pc = if keep {
                    &mut kept[(x * n + start) * m..(x * n + start + c) * m]
                } else {
                    &mut p[..c * m]
                };
                probs(&qv, &kv, x, start, c, pc);
                sgemm(
                    (c, dv, m),
                    pc,
                    (m, 1),
                    &vv[x * m * dv..],
                    (dv, 1),
                    &mut out[(x * n + start) * dv..],
                    dv,
                    false,
                );
                start += c;
            }
        }
        let backward: Backward3 = Box::new(move |gy| {
            let mut gq = vec![0f32; bh * n * d];
            let mut gk = vec![0f32; bh * m * d];
            let mut gv = vec![0f32; bh * m * dv];
            let mut p = vec![0f32; if keep { 0 } else { chunk * m }];
            let mut dp = vec![0f32; chunk * m];
            for x in 0..bh {
                let mut start = 0;
                while start < n {
                    let c = chunk.min(n - start);
                    let p: &[f32] = if keep {
                        &kept[(x * n + start) * m..(x * n + start + c) * m]
                    } else {
                        probs(&qv, &kv, x, start, c, &mut p);
                        &p[..c * m]
                    };
                    let go = &gy[(x * n + start) * dv..];
                    let vs = &vv[x * m * dv..];
                    // dP[c, m] = dO[c, dv] · Vᵀ
                    sgemm((c, m, dv), go, (dv, 1), vs, (1, dv), &mut dp, m, false);
                    // dV[m, dv] += Pᵀ · dO
                    sgemm(
                        (m, dv, c),
                        p,
                        (1, m),
                        go,
                        (dv, 1),
                        &mut gv[x * m * dv..],
                        dv,
                        start > 0,
                    );
                    // dS = P ∘ (dP - rowsum(dP ∘ P)) · scale (in dp)
                    for (pr, dr) in p.chunks_exact(m).zip(dp.chunks_exact_mut(m)) {
                        let dot = dot_f32(pr, dr);
                        for (dd, pp) in dr.iter_mut().zip(pr) {
                            *dd = pp * (*dd - dot) * scale;
                        }
                    }
                    // dQ[c, d] = dS · K
                    sgemm(
                        (c, d, m),
                        &dp,
                        (m, 1),
                        &kv[x * m * d..],
                        (d, 1),
                        &mut gq[(x * n + start) * d..],
                        d,
                        false,
                    );
                    // dK[m, d] += dSᵀ · Q_c
                    sgemm(
                        (m, d, c),
                        &dp,
                        (1, m),
                        &qv[(x * n + start) * d..],
                        (d, 1),
                        &mut gk[x * m * d..],
                        d,
                        start > 0,
                    );
                    start += c;
                }
            }
            [gq, gk, gv]
        });
        (out, backward)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2654435761).wrapping_add(12345);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    type T4 = Tensor<(usize, usize, usize, usize), f32, Cpu>;
    type T4t = Tensor<(usize, usize, usize, usize), f32, Cpu, OwnedTape<f32, Cpu>>;

    /// Gradient of `sum(f(x) * r)` w.r.t. each of `inputs` (through the tape) against central
    /// finite differences in f64 of the tape-free forward.
    fn grad_check(inputs: &[T4], f: &dyn Fn(Vec<T4t>) -> T4t, g: &dyn Fn(Vec<T4>) -> T4) {
        let eval = |xs: &[Vec<f32>]| -> f64 {
            let ts = inputs
                .iter()
                .zip(xs)
                .map(|(t, v)| t.device().tensor_from_vec(v.clone(), *t.shape()))
                .collect();
            let y = g(ts);
            let r = values(y.shape().num_elements(), 99);
            y.as_vec()
                .iter()
                .zip(&r)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum()
        };
        let dev = inputs[0].device().clone();
        let traced: Vec<T4t> = inputs.iter().map(|t| t.leaky_trace()).collect();
        let y = f(traced);
        let r = dev.tensor_from_vec(values(y.shape().num_elements(), 99), *y.shape());
        let grads = (y * r).sum().backward();
        let base: Vec<Vec<f32>> = inputs.iter().map(|t| t.as_vec()).collect();
        let eps = 1e-2f32;
        for (which, t) in inputs.iter().enumerate() {
            let gt = grads.get(t).as_vec();
            for i in 0..base[which].len() {
                let mut plus = base.clone();
                plus[which][i] += eps;
                let mut minus = base.clone();
                minus[which][i] -= eps;
                let fd = (eval(&plus) - eval(&minus)) / (2.0 * eps as f64);
                assert!(
                    (fd - gt[i] as f64).abs() < 3e-3 * (1.0 + fd.abs()),
                    "input {which} element {i}: tape {} vs finite difference {fd}",
                    gt[i]
                );
            }
        }
    }

    #[test]
    fn erf_matches_libm() {
        for i in -600..=600 {
            let x = i as f32 * 0.01;
            let (a, b) = (erf_f32(x) as f64, libm::erf(x as f64));
            assert!((a - b).abs() < 3e-7, "erf({x}): {a} vs {b}");
        }
    }

    #[test]
    fn exp_matches_std() {
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let (a, b) = (exp_f32(x), x.exp());
            assert!((a - b).abs() <= 4e-7 * b, "exp({x}): {a} vs {b}");
        }
    }

    #[test]
    fn norm_gradients() {
        let dev = Cpu::default();
        let (b, c, h, w) = (2, 6, 3, 2);
        let x = dev.tensor_from_vec(values(b * c * h * w, 1), (b, c, h, w));
        let gamma = values(c, 2).iter().map(|v| v + 1.0).collect::<Vec<_>>();
        let beta = values(c, 3);
        for silu in [false, true] {
            let gn = |x: Vec<T4t>| {
                let layout = NormLayout {
                    groups: b * 3,
                    len: 2 * h * w,
                    groups_per_item: 3,
                    channels_per_group: 2,
                    inner: h * w,
                };
                norm_affine(
                    x.into_iter().next().unwrap(),
                    layout,
                    gamma.clone(),
                    beta.clone(),
                    1e-5,
                    silu,
                    None,
                )
            };
            let gn0 = |x: Vec<T4>| {
                let layout = NormLayout {
                    groups: b * 3,
                    len: 2 * h * w,
                    groups_per_item: 3,
                    channels_per_group: 2,
                    inner: h * w,
                };
                norm_affine(
                    x.into_iter().next().unwrap(),
                    layout,
                    gamma.clone(),
                    beta.clone(),
                    1e-5,
                    silu,
                    None,
                )
            };
            grad_check(std::slice::from_ref(&x), &gn, &gn0);
        }
        // layer norm over the last axis (width 6)
        let x = dev.tensor_from_vec(values(36, 12), (2, 1, 3, 6));
        let ln = |x: Vec<T4t>| {
            let layout = NormLayout {
                groups: 2 * 3,
                len: 6,
                groups_per_item: 1,
                channels_per_group: 6,
                inner: 1,
            };
            norm_affine(
                x.into_iter().next().unwrap(),
                layout,
                vec![1.5, 0.5, 1.0, 0.8, 1.2, 0.9],
                vec![0.1, -0.2, 0.0, 0.3, 0.2, -0.1],
                1e-5,
                false,
                None,
            )
        };
        let ln0 = |x: Vec<T4>| {
            let layout = NormLayout {
                groups: 2 * 3,
                len: 6,
                groups_per_item: 1,
                channels_per_group: 6,
                inner: 1,
            };
            norm_affine(
                x.into_iter().next().unwrap(),
                layout,
                vec![1.5, 0.5, 1.0, 0.8, 1.2, 0.9],
                vec![0.1, -0.2, 0.0, 0.3, 0.2, -0.1],
                1e-5,
                false,
                None,
            )
        };
        grad_check(std::slice::from_ref(&x), &ln, &ln0);
    }

    #[test]
    fn linear_and_geglu_gradients_and_values() {
        let dev = Cpu::default();
        let (m, i, o) = (5, 4, 6);
        let x = dev.tensor_from_vec(values(m * i, 4), (1, 1, m, i));
        let wv = values(o * i, 5);
        let bv = values(o, 6);
        let lin = |x: Vec<T4t>| {
            let x = x.into_iter().next().unwrap().reshape_like(&(m, i));
            let y = linear(x, wv.clone(), Some(bv.clone()), o, Vec::new());
            geglu(y.reshape_like(&(1, m, o))).reshape_like(&(1, 1, m, o / 2))
        };
        let lin0 = |x: Vec<T4>| {
            let x = x.into_iter().next().unwrap().reshape_like(&(m, i));
            let y = linear(x, wv.clone(), Some(bv.clone()), o, Vec::new());
            geglu(y.reshape_like(&(1, m, o))).reshape_like(&(1, 1, m, o / 2))
        };
        grad_check(std::slice::from_ref(&x), &lin, &lin0);
        // values against dfdx ops: linear, then h * gelu(gate)
        let y = lin0(vec![x.clone()]).as_vec();
        let w = dev.tensor_from_vec(wv.clone(), (o, i));
        let bias = dev.tensor_from_vec(bv.clone(), (o,));
        let h = x
            .reshape_like(&(m, i))
            .matmul(w.permute::<_, Axes2<1, 0>>())
            + bias.broadcast_like::<_, Axis<0>>(&(m, o));
        let hv = h.as_vec();
        for r in 0..m {
            for j in 0..o / 2 {
                let (a, g) = (hv[r * o + j] as f64, hv[r * o + o / 2 + j] as f64);
                let gelu = 0.5 * g * (1.0 + libm::erf(g / std::f64::consts::SQRT_2));
                assert!((y[r * o / 2 + j] as f64 - a * gelu).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn attention_gradients() {
        let dev = Cpu::default();
        let (b, h, n, m, d) = (1, 2, 5, 4, 3);
        let q = dev.tensor_from_vec(values(b * h * n * d, 7), (b, h, n, d));
        let k = dev.tensor_from_vec(values(b * h * m * d, 8), (b, h, m, d));
        let v = dev.tensor_from_vec(values(b * h * m * d, 9), (b, h, m, d));
        for (chunk, kept) in [(2, usize::MAX), (n, usize::MAX), (2, 0), (n, 0)] {
            let f = |x: Vec<T4t>| {
                let mut it = x.into_iter();
                let (q, k, v) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
                attention_with(q, k, v, false, chunk, 0.7, kept)
            };
            let f0 = |x: Vec<T4>| {
                let mut it = x.into_iter();
                let (q, k, v) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
                attention(q, k, v, false, chunk, 0.7)
            };
            grad_check(&[q.clone(), k.clone(), v.clone()], &f, &f0);
        }
        // causal self-attention
        let kc = dev.tensor_from_vec(values(b * h * n * d, 10), (b, h, n, d));
        let vc = dev.tensor_from_vec(values(b * h * n * d, 11), (b, h, n, d));
        for kept in [usize::MAX, 0] {
            let f = |x: Vec<T4t>| {
                let mut it = x.into_iter();
                let (q, k, v) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
                attention_with(q, k, v, true, 2, 0.7, kept)
            };
            let f0 = |x: Vec<T4>| {
                let mut it = x.into_iter();
                let (q, k, v) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
                attention(q, k, v, true, 2, 0.7)
            };
            grad_check(&[q.clone(), kc.clone(), vc.clone()], &f, &f0);
        }
    }
}
