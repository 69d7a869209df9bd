//! Parameter-free operations: activations, zero padding, nearest upsampling.

use dfdx::prelude::*;

use super::Tensor4;
use super::elem::{Elem, lit};

/// SiLU (swish): `x · sigmoid(x)`.
pub fn silu<S: Shape, E: Elem, D: Device<E>, T: Tape<E, D>>(
    x: Tensor<S, E, D, T>,
) -> Tensor<S, E, D, T> {
    let s = x.retaped::<T>().sigmoid();
    x * s
}

/// CLIP's quick GELU: `x · sigmoid(1.702 x)`.
pub fn quick_gelu<S: Shape, E: Elem, D: Device<E>, T: Tape<E, D>>(
    x: Tensor<S, E, D, T>,
) -> Tensor<S, E, D, T> {
    let s = (x.retaped::<T>() * lit::<E>(1.702)).sigmoid();
    x * s
}

/// Exact (erf) GELU: `0.5 x (1 + erf(x / √2))`, PyTorch's default `gelu`.
///
/// dfdx 0.13's `accurate_gelu` computes this value but its derivative's second term
/// `x·φ(x)` is too large by a factor √2. The gradient is corrected with a term whose value is
/// exactly zero, `(√2 - 1)(φ(x) - φ(x)|detached)`, since `φ'(x) = -x·φ(x)`
/// (`φ` = standard normal density).
pub fn gelu<S: Shape, E: Elem, D: Device<E>, T: Tape<E, D>>(
    x: Tensor<S, E, D, T>,
) -> Tensor<S, E, D, T> {
    if !T::OWNS_TAPE {
        return x.accurate_gelu();
    }
    let inv_sqrt_2pi = 1.0 / (2.0 * std::f32::consts::PI).sqrt();
    let phi = |t: Tensor<S, E, D, T>| (t.square() * lit::<E>(-0.5)).exp() * lit::<E>(inv_sqrt_2pi);
    let detached = phi(x.retaped::<T>()).split_tape().0;
    let correction = (phi(x.retaped::<T>()) - detached) * lit::<E>(std::f32::consts::SQRT_2 - 1.0);
    x.accurate_gelu() + correction
}

/// Zero padding of the last two axes of `[b, c, h, w]`: `(top, bottom, left, right)`.
pub fn pad2d<E: Elem, D: Device<E>, T: Tape<E, D>>(
    x: Tensor4<D, T, E>,
    (top, bottom, left, right): (usize, usize, usize, usize),
) -> Tensor4<D, T, E> {
    let dev = x.device().clone();
    let mut x = x;
    let (b, c, _, w) = *x.shape();
    if top > 0 {
        let z = dev.zeros_like(&(b, c, top, w)).retaped::<T>();
        x = (z, x).concat_along(Axis::<2>);
    }
    if bottom > 0 {
        x = (x, dev.zeros_like(&(b, c, bottom, w))).concat_along(Axis::<2>);
    }
    let h = x.shape().2;
    if left > 0 {
        let z = dev.zeros_like(&(b, c, h, left)).retaped::<T>();
        x = (z, x).concat_along(Axis::<3>);
    }
    if right > 0 {
        x = (x, dev.zeros_like(&(b, c, h, right))).concat_along(Axis::<3>);
    }
    x
}

/// Nearest-neighbour upsampling by 2 of `[b, c, h, w] -> [b, c, 2h, 2w]`
/// (PyTorch `interpolate(scale_factor=2.0, mode="nearest")`).
pub fn upsample_nearest2x<E: Elem, D: Device<E>, T: Tape<E, D>>(
    x: Tensor4<D, T, E>,
) -> Tensor4<D, T, E> {
    let (b, c, h, w) = *x.shape();
    x.reshape_like(&(b * c, h, w))
        // [b*c, h, 2, w, 2]: each pixel repeated in a 2x2 block
        .broadcast_like::<_, Axes2<2, 4>>(&(b * c, h, 2, w, 2))
        .reshape_like(&(b, c, 2 * h, 2 * w))
}

/// Concatenates `parts` along axis `AX` of rank-4 tensors, pairwise so each value is copied
/// O(log n) times instead of O(n).
pub(crate) fn concat_many<const AX: isize, E: Elem, D: Device<E>, T: Tape<E, D>>(
    mut parts: Vec<Tensor4<D, T, E>>,
) -> Tensor4<D, T, E>
where
    (Tensor4<D, T, E>, Tensor4<D, T, E>): TryConcatAlong<Axis<AX>, Output = Tensor4<D, T, E>>,
{
    assert!(!parts.is_empty(), "concat_many of no tensors");
    while parts.len() > 1 {
        let mut next = Vec::with_capacity(parts.len().div_ceil(2));
        let mut it = parts.into_iter();
        while let Some(a) = it.next() {
            match it.next() {
                Some(b) => next.push((a, b).concat_along(Axis::<AX>)),
                None => next.push(a),
            }
        }
        parts = next;
    }
    parts.pop().expect("one part left")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Taylor series (f64, |x| <= 4).
    fn erf(x: f64) -> f64 {
        let mut sum = 0.0;
        let mut term = x; // (-1)^n x^(2n+1) / n!
        for n in 0..80 {
            sum += term / (2 * n + 1) as f64;
            term *= -x * x / (n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn gelu_value_and_gradient_are_exact() {
        let dev = Cpu::default();
        let xs: Vec<f32> = (-12..=12).map(|i| i as f32 * 0.3).collect();
        let x = dev.tensor_from_vec(xs.clone(), (xs.len(),));
        let y = gelu(x.leaky_trace());
        let values = y.as_vec();
        let g = y.sum().backward().get(&x).as_vec();
        for (i, &v) in xs.iter().enumerate() {
            let v = v as f64;
            let cdf = 0.5 * (1.0 + erf(v / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
            assert!((values[i] as f64 - v * cdf).abs() < 1e-6, "gelu({v})");
            assert!(
                (g[i] as f64 - (cdf + v * pdf)).abs() < 1e-5,
                "gelu'({v}): {} vs {}",
                g[i],
                cdf + v * pdf
            );
        }
    }
}
