//! Scaled dot-product attention computed in chunks of queries.

use dfdx::prelude::*;

use super::elem::{Elem, elems, lit};
use super::ops::concat_many;
use super::{Tensor3, Tensor4};

/// `[b, n, heads*d] -> [b, heads, n, d]` (contiguous).
pub fn split_heads<E: Elem, D: Device<E>, T: Tape<E, D>>(
    x: Tensor3<D, T, E>,
    heads: usize,
) -> Tensor4<D, T, E> {
    let (b, n, c) = *x.shape();
    let d = c / heads;
    x.reshape_like(&(b, n, heads, d))
        .permute::<_, Axes4<0, 2, 1, 3>>()
        .reshape_like(&(b, heads, n, d))
}

/// `[b, heads, n, d] -> [b, n, heads*d]`.
pub fn merge_heads<E: Elem, D: Device<E>, T: Tape<E, D>>(x: Tensor4<D, T, E>) -> Tensor3<D, T, E> {
    let (b, h, n, d) = *x.shape();
    x.permute::<_, Axes4<0, 2, 1, 3>>()
        .reshape_like(&(b, n, h * d))
}

/// Default number of queries per attention chunk: a 512x512 image's 4096-token self-attention
/// then holds at most `heads x 1024 x 4096` scores at once per batch item.
pub const DEFAULT_ATTENTION_CHUNK: usize = 1024;

/// `softmax(q kᵀ / √d [+ causal mask]) v` for `q: [b, h, n, d]`, `k: [b, h, m, d]`,
/// `v: [b, h, m, dv]` -> `[b, h, n, dv]`.
///
/// Queries are processed `chunk` at a time, so the score matrix held at once is
/// `[b, h, chunk, m]` instead of `[b, h, n, m]` (without a tape, each chunk's intermediates are
/// freed before the next). With `causal`, query `i` only attends to keys `j <= i` (CLIP).
pub fn scaled_dot_product_attention<E: Elem, D: Device<E>, T: Tape<E, D>>(
    q: Tensor4<D, T, E>,
    k: Tensor4<D, T, E>,
    v: Tensor4<D, T, E>,
    causal: bool,
    chunk: usize,
) -> Tensor4<D, T, E> {
    let (b, h, n, d) = *q.shape();
    let m = k.shape().2;
    let chunk = chunk.max(1);
    let scale = 1.0 / (d as f32).sqrt();
    let (q, k, v) = match E::fused_attention((q, k, v), causal, chunk, scale) {
        Ok(o) => return o,
        Err(qkv) => qkv,
    };
    let dev = q.device().clone();

    let (q, qt) = q.split_tape();
    let (k, kt) = k.split_tape();
    let (v, vt) = v.split_tape();
    let mut tape = Some(qt.merge(kt).merge(vt));
    // [b, h, d, m] (a strided view, no copy)
    let kt_view = k.permute::<_, Axes4<0, 1, 3, 2>>();

    let mut outs = Vec::with_capacity(n.div_ceil(chunk));
    let mut start = 0;
    while start < n {
        let end = (start + chunk).min(n);
        let t: T = tape.take().unwrap_or_default();
        let qc = if start == 0 && end == n {
            q.clone().put_tape(t)
        } else {
            // [b, h, c, d]
            q.clone().put_tape(t).slice((.., .., start..end, ..))
        };
        // [b, h, c, m]
        let mut scores = qc.matmul(kt_view.clone()) * lit::<E>(scale);
        if causal {
            let c = end - start;
            let mut mask = vec![0f32; c * m];
            for i in 0..c {
                for j in (start + i + 1)..m {
                    mask[i * m + j] = f32::NEG_INFINITY;
                }
            }
            let mask = dev.tensor_from_vec(elems(mask), (c, m));
            scores = scores + mask.broadcast_like::<_, Axes2<0, 1>>(&(b, h, c, m));
        }
        let probs = scores.softmax::<Axis<3>>();
        // [b, h, c, dv]
        outs.push(probs.matmul(v.clone()));
        start = end;
    }
    concat_many::<2, E, D, T>(outs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_equals_unchunked() {
        let dev = Cpu::default();
        let (b, h, n, m, d) = (2, 3, 10, 7, 4);
        let gen_vals = |len: usize, s: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i * 31 + s * 17) % 23) as f32 - 11.0) * 0.1)
                .collect()
        };
        let q = dev.tensor_from_vec(gen_vals(b * h * n * d, 1), (b, h, n, d));
        let k = dev.tensor_from_vec(gen_vals(b * h * m * d, 2), (b, h, m, d));
        let v = dev.tensor_from_vec(gen_vals(b * h * m * d, 3), (b, h, m, d));
        let full = scaled_dot_product_attention(q.clone(), k.clone(), v.clone(), false, n);
        let chunked = scaled_dot_product_attention(q.clone(), k.clone(), v.clone(), false, 3);
        for (a, c) in full.as_vec().iter().zip(chunked.as_vec()) {
            assert!((a - c).abs() < 1e-6);
        }
        // causal: the first query only sees the first key, so its output is v[0]
        let kq = dev.tensor_from_vec(gen_vals(b * h * n * d, 2), (b, h, n, d));
        let vq = dev.tensor_from_vec(gen_vals(b * h * n * d, 3), (b, h, n, d));
        let out = scaled_dot_product_attention(q, kq, vq.clone(), true, 4).as_vec();
        let vv = vq.as_vec();
        for i in 0..d {
            assert!((out[i] - vv[i]).abs() < 1e-6);
        }
    }

    #[test]
    fn chunked_gradients_equal_unchunked() {
        let dev = Cpu::default();
        let (b, h, n, d) = (1, 2, 9, 4);
        let vals = |s: usize| -> Vec<f32> {
            (0..b * h * n * d)
                .map(|i| (((i * 13 + s * 7) % 19) as f32 - 9.0) * 0.1)
                .collect()
        };
        let q = dev.tensor_from_vec(vals(1), (b, h, n, d));
        let k = dev.tensor_from_vec(vals(2), (b, h, n, d));
        let v = dev.tensor_from_vec(vals(3), (b, h, n, d));
        let r = dev.tensor_from_vec(vals(4), (b, h, n, d));
        let grads = |chunk: usize, causal: bool| {
            let out = scaled_dot_product_attention(
                q.leaky_trace(),
                k.retaped(),
                v.retaped(),
                causal,
                chunk,
            );
            let g = (out * r.clone()).sum().backward();
            [g.get(&q).as_vec(), g.get(&k).as_vec(), g.get(&v).as_vec()]
        };
        for causal in [false, true] {
            let full = grads(n, causal);
            let chunked = grads(4, causal);
            for (a, c) in full.iter().zip(&chunked) {
                for (x, y) in a.iter().zip(c) {
                    assert!((x - y).abs() < 1e-6, "chunked gradient {y} vs {x}");
                }
            }
        }
    }
}
