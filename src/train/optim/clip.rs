//! Gradient clipping by global norm, as `torch.nn.utils.clip_grad_norm_` (norm type 2).

use dfdx::prelude::*;

/// The L2 norm of a gradient (computed on its device).
pub fn grad_norm<S: Shape, D: Device<f32>>(grad: &Tensor<S, f32, D>) -> f32 {
    let n = grad.shape().num_elements();
    grad.clone()
        .reshape_like(&(n,))
        .square()
        .sum::<Rank0, _>()
        .as_vec()
        .first()
        .copied()
        .unwrap_or(0.0)
        .sqrt()
}

/// `clip_grad_norm_`'s factor: the total norm `sqrt(Σ normᵢ²)` of the per-tensor norms and
/// the coefficient `min(1, max_norm / (total + 1e-6))` every gradient is multiplied by.
pub fn clip_coefficient(norms: &[f32], max_norm: f32) -> (f32, f32) {
    let total = norms.iter().map(|n| n * n).sum::<f32>().sqrt();
    (total, (max_norm / (total + 1e-6)).min(1.0))
}

/// Clips gradients of one shape by their global norm in place, as
/// `torch.nn.utils.clip_grad_norm_(max_norm, norm_type=2)`; returns the total norm before
/// clipping. For gradients of mixed shapes use [`grad_norm`] and [`clip_coefficient`], then
/// multiply each gradient by the coefficient.
pub fn clip_grad_norm<S: Shape, D: Device<f32>>(
    grads: &mut [Tensor<S, f32, D>],
    max_norm: f32,
) -> f32 {
    let norms: Vec<f32> = grads.iter().map(grad_norm).collect();
    let (total, coef) = clip_coefficient(&norms, max_norm);
    for g in grads.iter_mut() {
        *g = g.clone() * coef;
    }
    total
}
