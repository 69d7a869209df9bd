//! 2-D convolution on dfdx's stable ops (its own `conv2d` needs nightly).
//!
//! Implementation: im2col. The `kh·kw` shifted (strided, zero-padded) windows of the input are
//! gathered into `[c·kh·kw, ho·wo]` columns and one matmul with the weight viewed as
//! `[c_out, c·kh·kw]` gives the output. On the CPU the whole convolution is one host kernel
//! (im2col into a reused buffer, gemm, bias) whose backward gives the input gradient
//! (`Wᵀ · dy`, then col2im), the weight being frozen (see `host`); on other devices it is dfdx
//! ops (one `gather`, whose backward accumulates, and a batched matmul). Either way gradients
//! flow to the input through the tape. This file is the only place convolution is
//! implemented: a faster kernel can replace [`conv2d`] without touching the models.

use dfdx::prelude::*;

use super::elem::{Elem, lit};
use super::host::{BackwardP, flat, host_op_params, host_vec, sgemm, sum_f32};
use super::ops::concat_many;
use super::weights::Loader;
use super::{Tensor1, Tensor3, Tensor4};
use crate::diffusion::error::Result;

/// Zero padding of a convolution: rows added on top/bottom, columns on left/right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Padding2d {
    /// Rows of zeros above.
    pub top: usize,
    /// Rows of zeros below.
    pub bottom: usize,
    /// Columns of zeros on the left.
    pub left: usize,
    /// Columns of zeros on the right.
    pub right: usize,
}

impl Padding2d {
    /// The same padding `p` on all four sides (PyTorch's `padding=p`).
    pub fn same(p: usize) -> Self {
        Self {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }
}

/// A 2-D convolution layer with PyTorch's weight layout `[c_out, c_in, kh, kw]`.
#[derive(Debug, Clone)]
pub struct Conv2d<D: Storage<E>, E = f32> {
    /// `[c_out, c_in, kh, kw]`
    pub weight: Tensor4<D, NoneTape, E>,
    /// `[c_out]`
    pub bias: Option<Tensor1<D, NoneTape, E>>,
    /// Stride along both axes.
    pub stride: usize,
    /// Zero padding.
    pub padding: Padding2d,
    /// A low-rank adapter added to the output (LoCon; the weight stays untouched).
    pub lora: Option<ConvLoraAdapter<D, E>>,
    /// A full-size update `ΔW` (`[c_out, c_in, kh, kw]`) convolved with the input beside the
    /// weight: how LoHa, LoKr and DoRA modules act (see [`Linear::delta`](super::Linear::delta)).
    pub delta: Option<Tensor4<D, NoneTape, E>>,
    /// Whether the weight and bias get gradients under a tape (full fine-tuning).
    pub trainable: bool,
}

/// A LoRA pair on a [`Conv2d`] as kohya's LoCon and LyCORIS build it: `down` is a convolution
/// with the layer's kernel, stride and padding into `r` channels (`[r, c_in, kh, kw]`, kohya's
/// `lora_down`), `up` a 1×1 convolution back (`[c_out, r, 1, 1]`, `lora_up`), their output
/// scaled by `multiplier · alpha / r` and added to the layer's. Merged, it adds
/// `scale · up · down` to the weight.
///
/// The tensors carry no tape; [`Conv2d::forward`] puts them on the activation's, so a backward
/// pass yields their gradients under their own ids (`grads.get(&adapter.down)`).
#[derive(Debug, Clone)]
pub struct ConvLoraAdapter<D: Storage<E>, E = f32> {
    /// `[r, c_in, kh, kw]`
    pub down: Tensor4<D, NoneTape, E>,
    /// `[c_out, r, 1, 1]`
    pub up: Tensor4<D, NoneTape, E>,
    /// `multiplier · alpha / r`.
    pub scale: f32,
}

impl<E: Elem, D: Device<E>> Conv2d<D, E> {
    /// Loads a square-kernel convolution with bias under the loader's prefix.
    pub fn load(
        l: &Loader<D, E>,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: Padding2d,
    ) -> Result<Self> {
        Ok(Self {
            weight: l.tensor4("weight", (c_out, c_in, kernel, kernel))?,
            bias: Some(l.tensor1("bias", c_out)?),
            stride,
            padding,
            lora: None,
            delta: None,
            trainable: false,
        })
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.weight.shape().0
    }

    /// `[b, c_in, h, w] -> [b, c_out, ho, wo]`
    pub fn forward<T: Tape<E, D>>(&self, x: Tensor4<D, T, E>) -> Tensor4<D, T, E> {
        let lora_input = self.lora.as_ref().map(|_| x.retaped::<T>());
        let delta_input = self.delta.as_ref().map(|_| x.retaped::<T>());
        let y = conv2d_with(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
            true,
            MAX_COLS_ELEMENTS,
            self.trainable && T::OWNS_TAPE,
        );
        // [b, c_in, h, w] -> [b, c_out, ho, wo] through ΔW, which joins the tape
        let y = match (&self.delta, delta_input) {
            (Some(d), Some(x)) => {
                let train = T::OWNS_TAPE;
                let (stride, padding) = (self.stride, self.padding);
                y + conv2d_with(x, d, None, stride, padding, true, MAX_COLS_ELEMENTS, train)
            }
            _ => y,
        };
        match (&self.lora, lora_input) {
            (Some(lora), Some(x)) => {
                // the adapter's tensors join the tape when there is one (they train)
                let train = T::OWNS_TAPE;
                let conv = |x, w, stride, padding| {
                    conv2d_with(x, w, None, stride, padding, true, MAX_COLS_ELEMENTS, train)
                };
                // [b, c_in, h, w] -> [b, r, ho, wo] -> [b, c_out, ho, wo]
                let z = conv(x, &lora.down, self.stride, self.padding);
                let z = conv(z, &lora.up, 1, Padding2d::default());
                y + z * lit::<E>(lora.scale)
            }
            _ => y,
        }
    }
}

/// Convolution of `x: [b, c, h, w]` with `weight: [c_out, c, kh, kw]` (+ `bias: [c_out]`),
/// stride `stride` on both axes, zero padding `padding`: PyTorch's `F.conv2d` semantics.
///
/// Panics if the input's channels differ from the weight's (the models check their inputs).
///
/// On the CPU one fused host kernel (no gradient for the frozen weight and bias); on other
/// devices dfdx ops (same numbers).
pub fn conv2d<E: Elem, D: Device<E>, T: Tape<E, D>>(
    x: Tensor4<D, T, E>,
    weight: &Tensor4<D, NoneTape, E>,
    bias: Option<&Tensor1<D, NoneTape, E>>,
    stride: usize,
    padding: Padding2d,
) -> Tensor4<D, T, E> {
    conv2d_with(
        x,
        weight,
        bias,
        stride,
        padding,
        true,
        MAX_COLS_ELEMENTS,
        false,
    )
}

/// Largest im2col matrix built at once (elements, 128 MiB of f32): bigger outputs are computed
/// in bands of rows, so a 512x512 VAE level does not need a multi-GB column matrix.
const MAX_COLS_ELEMENTS: usize = 1 << 25;

/// `train`: the weight and bias get gradients (their tensor ids) under the tape.
#[allow(clippy::too_many_arguments)]
fn conv2d_with<E: Elem, D: Device<E>, T: Tape<E, D>>(
    x: Tensor4<D, T, E>,
    weight: &Tensor4<D, NoneTape, E>,
    bias: Option<&Tensor1<D, NoneTape, E>>,
    stride: usize,
    padding: Padding2d,
    fused: bool,
    max_cols: usize,
    train: bool,
) -> Tensor4<D, T, E> {
    let (c_out, c_in, kh, kw) = *weight.shape();
    let (b, c, _, _) = *x.shape();
    assert_eq!(
        c, c_in,
        "conv2d: input has {c} channels, weight expects {c_in}"
    );
    assert!(stride > 0, "conv2d: stride 0");
    let (_, _, h, w) = *x.shape();
    let hp = h + padding.top + padding.bottom;
    let wp = w + padding.left + padding.right;
    assert!(
        hp >= kh && wp >= kw,
        "conv2d: input smaller than the kernel"
    );
    let ho = (hp - kh) / stride + 1;
    let wo = (wp - kw) / stride + 1;
    let k = c_in * kh * kw;

    let x = if fused {
        match E::fused_conv2d(x, weight, bias, stride, padding, (ho, wo), max_cols, train) {
            Ok(y) => return y,
            Err(x) => x,
        }
    } else {
        x
    };
    if kh == 1 && kw == 1 && stride == 1 && padding == Padding2d::default() {
        // the input is its own column matrix: [b, c, h*w]
        let y = weight_matmul(x.reshape_like(&(b, c, h * w)), weight, train);
        return add_bias(y.reshape_like(&(b, c_out, ho, wo)), bias, train);
    }
    // output rows per band, so that the column matrix stays under `max_cols` elements
    let band = (max_cols / (b * k * wo).max(1)).clamp(1, ho);
    let (x, tape) = x.contiguous().split_tape();
    let mut tape = Some(tape);
    let mut bands = Vec::with_capacity(ho.div_ceil(band));
    let mut oy0 = 0;
    while oy0 < ho {
        let rows = band.min(ho - oy0);
        let xi = x.clone().put_tape(tape.take().unwrap_or_default());
        let g = Geometry {
            b,
            c,
            h,
            w,
            kh,
            kw,
            s: stride,
            top: padding.top,
            left: padding.left,
            oy0,
            ho: rows,
            wo,
        };
        // [b, c*kh*kw, rows*wo]
        let cols = im2col(xi, g);
        bands.push(weight_matmul(cols, weight, train).reshape_like(&(b, c_out, rows, wo)));
        oy0 += rows;
    }
    let y = if bands.len() == 1 {
        bands.pop().expect("one band")
    } else {
        concat_many::<2, E, D, T>(bands)
    };
    add_bias(y, bias, train)
}

/// `[c_out, c, kh, kw]` (viewed `[c_out, k]`) times columns `[b, k, n]` -> `[b, c_out, n]`.
fn weight_matmul<E: Elem, D: Device<E>, T: Tape<E, D>>(
    cols: Tensor3<D, T, E>,
    weight: &Tensor4<D, NoneTape, E>,
    train: bool,
) -> Tensor3<D, T, E> {
    let (b, k, _) = *cols.shape();
    let c_out = weight.shape().0;
    if train {
        // the weight joins the tape: [c_out, k] -> [b, c_out, k], its gradient summed over b
        let w = weight
            .retaped::<T>()
            .reshape_like(&(c_out, k))
            .broadcast_like::<_, Axis<0>>(&(b, c_out, k));
        return w.matmul(cols);
    }
    // [c_out, k] viewed for every batch item: [b, c_out, k] (stride 0 on b, no copy)
    let w = weight
        .clone()
        .reshape_like(&(c_out, k))
        .broadcast_like::<_, Axis<0>>(&(b, c_out, k));
    // the tape moves to the left operand, dfdx's binary ops merge right tapes into left ones
    let (cols, tape) = cols.split_tape();
    w.put_tape(tape).matmul(cols)
}

fn add_bias<E: Elem, D: Device<E>, T: Tape<E, D>>(
    y: Tensor4<D, T, E>,
    bias: Option<&Tensor1<D, NoneTape, E>>,
    train: bool,
) -> Tensor4<D, T, E> {
    let shape = *y.shape();
    if train && let Some(bias) = bias {
        return y + bias
            .retaped::<T>()
            .broadcast_like::<_, Axes3<0, 2, 3>>(&shape);
    }
    match bias {
        Some(bias) => y + bias.clone().broadcast_like::<_, Axes3<0, 2, 3>>(&shape),
        None => y,
    }
}

/// Geometry of an im2col: input `[b, c, h, w]`, kernel `kh x kw`, stride `s`, padding
/// `top`/`left` (bottom/right follow from the output width `wo`), output rows
/// `oy0 .. oy0 + ho` (a band of the full output).
#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    s: usize,
    top: usize,
    left: usize,
    oy0: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    /// Calls `f(col_index, x_index)` for every column entry that reads an input pixel
    /// (entries in the padding are skipped), in the order of the column matrix.
    #[inline(always)]
    fn for_each(&self, mut f: impl FnMut(usize, usize)) {
        let (k, n) = (self.kh * self.kw, self.ho * self.wo);
        for plane in 0..self.b * self.c {
            let x_plane = plane * self.h * self.w;
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = (plane * k + ky * self.kw + kx) * n;
                    // output columns whose input column lies inside the image
                    let ox_lo = self.left.saturating_sub(kx).div_ceil(self.s);
                    let ox_hi = ((self.w + self.left).saturating_sub(kx)).div_ceil(self.s);
                    let ox_hi = ox_hi.min(self.wo);
                    for oy in 0..self.ho {
                        let iy = (self.oy0 + oy) * self.s + ky;
                        if iy < self.top || iy - self.top >= self.h {
                            continue;
                        }
                        let x_row = x_plane + (iy - self.top) * self.w;
                        let out_row = row + oy * self.wo;
                        for ox in ox_lo..ox_hi {
                            f(out_row + ox, x_row + ox * self.s + kx - self.left);
                        }
                    }
                }
            }
        }
    }
}

/// The whole convolution on the host (CPU device): per batch item and band of output rows,
/// im2col into a reused buffer and one gemm with the weight, bias added; one backward op gives
/// the input gradient (`Wᵀ · dy`, then col2im), and with `train` the weight and bias gradients.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv2d_host<D: Device<f32>, T: Tape<f32, D>>(
    x: Tensor4<D, T>,
    weight: &Tensor4<D>,
    bias: Option<&Tensor1<D>>,
    stride: usize,
    padding: Padding2d,
    (ho, wo): (usize, usize),
    max_cols: usize,
    train: bool,
) -> Tensor4<D, T> {
    let (b, c, h, w) = *x.shape();
    let (c_out, _, kh, kw) = *weight.shape();
    let trained: Vec<Tensor1<D>> = if train {
        std::iter::once(flat(weight)).chain(bias.cloned()).collect()
    } else {
        Vec::new()
    };
    let has_bias = bias.is_some();
    let (k, n, hw) = (c * kh * kw, ho * wo, h * w);
    let pointwise = kh == 1 && kw == 1 && stride == 1 && padding == Padding2d::default();
    // output rows per band, so that the column matrix stays under `max_cols` elements
    let band = (max_cols / (k * wo).max(1)).clamp(1, ho.max(1));
    let wv = host_vec(weight);
    let bv = bias.map(host_vec);
    let geometry = move |oy0: usize, rows: usize| Geometry {
        b: 1,
        c,
        h,
        w,
        kh,
        kw,
        s: stride,
        top: padding.top,
        left: padding.left,
        oy0,
        ho: rows,
        wo,
    };
    host_op_params(x, (b, c_out, ho, wo), trained, move |xv| {
        let mut y = vec![0f32; b * c_out * n];
        let mut cols = vec![0f32; if pointwise { 0 } else { k * band * wo }];
        for bi in 0..b {
            let xb = &xv[bi * c * hw..(bi + 1) * c * hw];
            let yb = &mut y[bi * c_out * n..(bi + 1) * c_out * n];
            let mut oy0 = 0;
            while oy0 < ho {
                let rows = band.min(ho - oy0);
                let nb = rows * wo;
                // [k, nb] columns: the input itself for a pointwise conv
                let (src, ld): (&[f32], usize) = if pointwise {
                    (&xb[oy0 * wo..], n)
                } else {
                    cols[..k * nb].fill(0.0);
                    geometry(oy0, rows).for_each(|o, i| cols[o] = xb[i]);
                    (&cols, nb)
                };
                sgemm(
                    (c_out, nb, k),
                    &wv,
                    (k, 1),
                    src,
                    (ld, 1),
                    &mut yb[oy0 * wo..],
                    n,
                    false,
                );
                oy0 += rows;
            }
            if let Some(bv) = &bv {
                for (row, bias) in yb.chunks_exact_mut(n).zip(bv) {
                    row.iter_mut().for_each(|v| *v += bias);
                }
            }
        }
        // the weight gradient needs the input (and a column buffer); otherwise keep neither
        let (xv, mut cols) = if train {
            (xv, cols)
        } else {
            (Vec::new(), Vec::new())
        };
        let backward: BackwardP = Box::new(move |gy, gx| {
            let mut gcols = vec![0f32; if pointwise { 0 } else { k * band * wo }];
            let mut gw = vec![0f32; if train { c_out * k } else { 0 }];
            for bi in 0..b {
                let xb = if train {
                    &xv[bi * c * hw..(bi + 1) * c * hw]
                } else {
                    &[]
                };
                let gyb = &gy[bi * c_out * n..(bi + 1) * c_out * n];
                let gxb = &mut gx[bi * c * hw..(bi + 1) * c * hw];
                let mut oy0 = 0;
                while oy0 < ho {
                    let rows = band.min(ho - oy0);
                    let nb = rows * wo;
                    if train {
                        // dW[c_out, k] += dy[c_out, nb] · cols[k, nb]ᵀ
                        let (src, ld): (&[f32], usize) = if pointwise {
                            (&xb[oy0 * wo..], n)
                        } else {
                            cols[..k * nb].fill(0.0);
                            geometry(oy0, rows).for_each(|o, i| cols[o] = xb[i]);
                            (&cols, nb)
                        };
                        sgemm(
                            (c_out, k, nb),
                            &gyb[oy0 * wo..],
                            (n, 1),
                            src,
                            (1, ld),
                            &mut gw,
                            k,
                            true,
                        );
                    }
                    // d cols[k, nb] = Wᵀ[k, c_out] · dy[c_out, nb]
                    if pointwise {
                        sgemm(
                            (k, nb, c_out),
                            &wv,
                            (1, k),
                            &gyb[oy0 * wo..],
                            (n, 1),
                            &mut gxb[oy0 * wo..],
                            n,
                            true,
                        );
                    } else {
                        sgemm(
                            (k, nb, c_out),
                            &wv,
                            (1, k),
                            &gyb[oy0 * wo..],
                            (n, 1),
                            &mut gcols,
                            nb,
                            false,
                        );
                        geometry(oy0, rows).for_each(|o, i| gxb[i] += gcols[o]);
                    }
                    oy0 += rows;
                }
            }
            if !train {
                return Vec::new();
            }
            let mut grads = vec![gw];
            if has_bias {
                let gb: Vec<f32> = (0..c_out)
                    .map(|o| {
                        (0..b)
                            .map(|bi| sum_f32(&gy[(bi * c_out + o) * n..(bi * c_out + o + 1) * n]))
                            .sum()
                    })
                    .collect();
                grads.push(gb);
            }
            grads
        });
        (y, backward)
    })
}

/// `[b, c, h, w]` -> `[b, c*kh*kw, ho*wo]`: row `ci*kh*kw + ky*kw + kx`, column `oy*wo + ox`
/// holds input pixel `(oy*s + ky - top, ox*s + kx - left)` of channel `ci`, or 0 in the padding.
///
/// Done as one gather over the pixel axis (the padding is an extra all-zero row), because
/// dfdx 0.13's `slice` backward assigns instead of accumulating, which breaks the gradient of
/// overlapping windows; `gather`'s backward accumulates.
fn im2col<E: Elem, D: Device<E>, T: Tape<E, D>>(
    x: Tensor4<D, T, E>,
    g: Geometry,
) -> Tensor3<D, T, E> {
    let (b, c, h, w) = (g.b, g.c, g.h, g.w);
    let dev = x.device().clone();
    let bc = b * c;
    let zero_row = h * w;
    // [h*w, b*c]: one row per pixel position
    let rows = x
        .reshape_like(&(bc, h * w))
        .permute::<_, Axes2<1, 0>>()
        .reshape_like(&(h * w, bc));
    // [h*w + 1, b*c]: the last row is the zero padding
    let rows = (rows, dev.zeros_like(&(1, bc))).concat_along(Axis::<0>);
    let (k, n) = (g.kh * g.kw, g.ho * g.wo);
    let mut index = Vec::with_capacity(k * n);
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            for oy in 0..g.ho {
                let iy = ((g.oy0 + oy) * g.s + ky) as isize - g.top as isize;
                for ox in 0..g.wo {
                    let ix = (ox * g.s + kx) as isize - g.left as isize;
                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                        index.push(zero_row);
                    } else {
                        index.push(iy as usize * w + ix as usize);
                    }
                }
            }
        }
    }
    let index = dev.tensor_from_vec(index, (k * n,));
    // [k*n, b*c]
    let cols: Tensor<(usize, usize), E, D, T> = rows.gather(index);
    cols.reshape_like(&(k, n, b, c))
        // [b, c, k, n]
        .permute::<_, Axes4<2, 3, 0, 1>>()
        .reshape_like(&(b, c * k, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A LoCon adapter gives what its merged weight `W + scale · up · down` gives, and its
    /// `down` and `up` get the gradients a finite difference measures (the loss is linear in
    /// each, so the difference is exact up to rounding), at stride 1 and 2.
    #[test]
    fn lora_adapter_is_its_merged_weight_and_trains() {
        let dev = Cpu::default();
        let v = |n: usize, k: f32| {
            (0..n)
                .map(|i| (i as f32 * k).sin() * 0.5)
                .collect::<Vec<_>>()
        };
        let (b, ci, co, r, h, w) = (2, 3, 5, 2, 7, 6);
        let k = ci * 9;
        let weight: Tensor4<Cpu> = dev.tensor_from_vec(v(co * k, 0.37), (co, ci, 3, 3));
        let bias: Tensor1<Cpu> = dev.tensor_from_vec(v(co, 1.3), (co,));
        let (dv, uv) = (v(r * k, 0.71), v(co * r, 0.53));
        let scale = 0.75;
        let x: Tensor4<Cpu> = dev.tensor_from_vec(v(b * ci * h * w, 0.19), (b, ci, h, w));
        for stride in [1, 2] {
            let with = |down: Vec<f32>, up: Vec<f32>| Conv2d {
                weight: weight.clone(),
                bias: Some(bias.clone()),
                stride,
                padding: Padding2d::same(1),
                lora: Some(ConvLoraAdapter {
                    down: dev.tensor_from_vec(down, (r, ci, 3, 3)),
                    up: dev.tensor_from_vec(up, (co, r, 1, 1)),
                    scale,
                }),
                delta: None,
                trainable: false,
            };
            let layer = with(dv.clone(), uv.clone());
            let mut merged_w = weight.as_vec();
            for o in 0..co {
                for j in 0..k {
                    merged_w[o * k + j] +=
                        scale * (0..r).map(|q| uv[o * r + q] * dv[q * k + j]).sum::<f32>();
                }
            }
            let merged = Conv2d {
                weight: dev.tensor_from_vec(merged_w, (co, ci, 3, 3)),
                lora: None,
                ..layer.clone()
            };
            let y = layer.forward(x.clone());
            let shape = *y.shape();
            let (a, m) = (y.as_vec(), merged.forward(x.clone()).as_vec());
            let diff = a
                .iter()
                .zip(&m)
                .map(|(a, m)| (a - m).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < 1e-5,
                "stride {stride}: adapter vs merged differ by {diff}"
            );

            let rv = v(a.len(), 0.23);
            let loss = |l: &Conv2d<Cpu>| -> f64 {
                let y = l.forward(x.clone()).as_vec();
                y.iter().zip(&rv).map(|(y, r)| (y * r) as f64).sum()
            };
            let weights: Tensor4<Cpu> = dev.tensor_from_vec(rv.clone(), shape);
            let grads = (layer.forward(x.leaky_trace()) * weights).sum().backward();
            let adapter = layer.lora.as_ref().unwrap();
            let (gd, gu) = (
                grads.get(&adapter.down).as_vec(),
                grads.get(&adapter.up).as_vec(),
            );
            let base = loss(&layer);
            let step = 1e-2f32;
            for idx in [0, 7, r * k - 1] {
                let mut d = dv.clone();
                d[idx] += step;
                let fd = (loss(&with(d, uv.clone())) - base) / step as f64;
                assert!(
                    (fd - gd[idx] as f64).abs() < 2e-3,
                    "down[{idx}]: {fd} vs {}",
                    gd[idx]
                );
            }
            for idx in [0, co * r - 1] {
                let mut u = uv.clone();
                u[idx] += step;
                let fd = (loss(&with(dv.clone(), u)) - base) / step as f64;
                assert!(
                    (fd - gu[idx] as f64).abs() < 2e-3,
                    "up[{idx}]: {fd} vs {}",
                    gu[idx]
                );
            }
        }
    }

    /// Direct (loop) convolution, the reference.
    #[allow(clippy::too_many_arguments)]
    fn conv_ref(
        x: &[f32],
        (b, c, h, w): (usize, usize, usize, usize),
        wt: &[f32],
        (co, kh, kw): (usize, usize, usize),
        bias: &[f32],
        s: usize,
        p: Padding2d,
    ) -> (Vec<f32>, (usize, usize, usize, usize)) {
        let hp = h + p.top + p.bottom;
        let wp = w + p.left + p.right;
        let ho = (hp - kh) / s + 1;
        let wo = (wp - kw) / s + 1;
        let mut out = vec![0f32; b * co * ho * wo];
        for bi in 0..b {
            for o in 0..co {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = bias[o] as f64;
                        for ci in 0..c {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * s + ky) as isize - p.top as isize;
                                    let ix = (ox * s + kx) as isize - p.left as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xv = x[((bi * c + ci) * h + iy as usize) * w + ix as usize];
                                    let wv = wt[((o * c + ci) * kh + ky) * kw + kx];
                                    acc += (xv * wv) as f64;
                                }
                            }
                        }
                        out[((bi * co + o) * ho + oy) * wo + ox] = acc as f32;
                    }
                }
            }
        }
        (out, (b, co, ho, wo))
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // deterministic pseudo-random values in [-1, 1]
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

    /// Weight and bias gradients of the fused kernel against the dfdx-op path (band splits
    /// included), for strided, padded, pointwise and batched cases.
    #[test]
    fn weight_and_bias_gradients_match_dfdx_ops() {
        let dev = Cpu::default();
        for (shape, co, k, s, p, max_cols) in [
            ((2, 3, 6, 5), 4, 3, 1, Padding2d::same(1), 1 << 20),
            ((1, 2, 7, 7), 3, 3, 2, Padding2d::same(1), 12),
            ((2, 4, 3, 3), 5, 1, 1, Padding2d::default(), 1 << 20),
        ] {
            let (b, c, h, w) = shape;
            let x = dev.tensor_from_vec(values(b * c * h * w, 7), shape);
            let wt = dev.tensor_from_vec(values(co * c * k * k, 8), (co, c, k, k));
            let bias = dev.tensor_from_vec(values(co, 9), (co,));
            let grads_of = |host: bool| {
                let y = conv2d_with(
                    x.leaky_trace(),
                    &wt,
                    Some(&bias),
                    s,
                    p,
                    host,
                    max_cols,
                    true,
                );
                let r = dev.tensor_from_vec(values(y.shape().num_elements(), 10), *y.shape());
                let g = (y * r).sum().backward();
                (
                    g.get(&wt).as_vec(),
                    g.get(&bias).as_vec(),
                    g.get(&x).as_vec(),
                )
            };
            let (hw, hb, hx) = grads_of(true);
            let (rw, rb, rx) = grads_of(false);
            for (name, a, r) in [("weight", hw, rw), ("bias", hb, rb), ("input", hx, rx)] {
                let max = a
                    .iter()
                    .zip(&r)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    max < 1e-4,
                    "{name} gradient differs by {max} for {shape:?} k{k} s{s}"
                );
            }
        }
    }

    fn check(shape: (usize, usize, usize, usize), co: usize, k: usize, s: usize, p: Padding2d) {
        let dev = Cpu::default();
        let (b, c, h, w) = shape;
        let xv = values(b * c * h * w, 1);
        let wv = values(co * c * k * k, 2);
        let bv = values(co, 3);
        let x = dev.tensor_from_vec(xv.clone(), shape);
        let wt = dev.tensor_from_vec(wv.clone(), (co, c, k, k));
        let bias = dev.tensor_from_vec(bv.clone(), (co,));
        let y = conv2d(x, &wt, Some(&bias), s, p);
        let (expected, eshape) = conv_ref(&xv, shape, &wv, (co, k, k), &bv, s, p);
        assert_eq!(*y.shape(), eshape);
        let got = y.as_vec();
        let max = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max < 1e-5,
            "max abs error {max} for {shape:?} k{k} s{s} {p:?}"
        );
    }

    #[test]
    fn conv_matches_direct_convolution() {
        check((2, 3, 5, 6), 4, 3, 1, Padding2d::same(1));
        check((1, 3, 6, 6), 5, 3, 2, Padding2d::same(1));
        check((1, 2, 7, 5), 3, 3, 2, Padding2d::same(1));
        // VAE downsampler: pad right/bottom by 1, 3x3 stride 2, no padding
        check(
            (2, 3, 8, 8),
            4,
            3,
            2,
            Padding2d {
                top: 0,
                bottom: 1,
                left: 0,
                right: 1,
            },
        );
        check((2, 6, 4, 5), 3, 1, 1, Padding2d::default());
        check((1, 2, 6, 6), 3, 1, 2, Padding2d::default());
    }

    /// Gradient of `sum(conv(x) * r)` w.r.t. `x` against central finite differences.
    /// Gradient of `sum(conv(x) * r) + sum(x * q)` w.r.t. `x` (the second term checks that
    /// the conv's gradient adds to other uses of `x`) against central finite differences.
    fn grad_check(s: usize, p: Padding2d, host: bool, max_cols: usize) {
        let dev = Cpu::default();
        let shape = (2, 3, 6, 5);
        let (co, k) = (4, 3);
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let xv = values(n, 7);
        let qv = values(n, 11);
        let wt = dev.tensor_from_vec(values(co * shape.1 * k * k, 8), (co, shape.1, k, k));
        let bias = dev.tensor_from_vec(values(co, 9), (co,));
        let f = |xv: Vec<f64>| -> f64 {
            let x = dev.tensor_from_vec(xv.iter().map(|v| *v as f32).collect(), shape);
            let y = conv2d_with(x, &wt, Some(&bias), s, p, host, max_cols, false);
            let r = values(y.shape().num_elements(), 10);
            let conv: f64 = y
                .as_vec()
                .iter()
                .zip(&r)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            conv + xv.iter().zip(&qv).map(|(a, b)| a * *b as f64).sum::<f64>()
        };
        let x = dev.tensor_from_vec(xv.clone(), shape);
        let q = dev.tensor_from_vec(qv.clone(), shape);
        let xt = x.leaky_trace();
        let other = (xt.retaped::<OwnedTape<f32, Cpu>>() * q).sum();
        let y = conv2d_with(xt, &wt, Some(&bias), s, p, host, max_cols, false);
        let r = dev.tensor_from_vec(values(y.shape().num_elements(), 10), *y.shape());
        let grads = ((y * r).sum() + other).backward();
        let g = grads.get(&x).as_vec();
        let eps = 1e-2;
        for i in 0..n {
            let mut plus: Vec<f64> = xv.iter().map(|v| *v as f64).collect();
            let mut minus = plus.clone();
            plus[i] += eps;
            minus[i] -= eps;
            let fd = (f(plus) - f(minus)) / (2.0 * eps);
            assert!(
                (fd - g[i] as f64).abs() < 2e-3,
                "grad {i}: tape {} vs finite difference {fd} (stride {s}, host {host})",
                g[i]
            );
        }
    }

    #[test]
    fn conv_gradient_matches_finite_differences() {
        // max_cols 100: bands of one or two output rows
        for (host, max_cols) in [
            (true, usize::MAX),
            (false, usize::MAX),
            (true, 100),
            (false, 100),
        ] {
            grad_check(1, Padding2d::same(1), host, max_cols);
            grad_check(2, Padding2d::same(1), host, max_cols);
            grad_check(
                2,
                Padding2d {
                    top: 0,
                    bottom: 1,
                    left: 0,
                    right: 1,
                },
                host,
                max_cols,
            );
        }
    }
}
