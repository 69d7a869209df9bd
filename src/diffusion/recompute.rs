//! Gradient checkpointing: a block's activations are not kept for the backward pass; its
//! forward runs again, on the saved input, when the backward pass reaches it.
//!
//! Under a tape, [`checkpoint`] runs the block on a throw-away tape (its activations are freed
//! as soon as the output exists) and records one backward op. That op recomputes the block
//! on a fresh tape from the saved input, backpropagates the output's gradient through it, and
//! adds the gradients of the input and of the block's other differentiable inputs (the time
//! embedding or the text states, the trainable parameters) into the outer gradients; the
//! recomputation's intermediate gradients are dropped with it. The memory held between the
//! forward and the backward pass falls from every activation of every block to the blocks'
//! inputs, for one extra forward pass of each block.
//!
//! The result equals the plain backward pass up to the order of floating-point additions
//! (random parts of a block, such as LoRA dropout, are seeded and recompute the same).

use dfdx::prelude::*;

use super::nn::elem::Elem;
use super::nn::{Tensor1, Tensor4};
use crate::diffusion::params::{Layer, Layers};

/// The tape a recomputed block runs under.
pub type RecomputeTape<D, E> = OwnedTape<E, D>;

/// Runs `block` on `x` with checkpointing when `x` carries a tape (plainly otherwise).
///
/// `inputs` are flat views (same ids, see [`flat_view`]) of every other tensor whose gradient
/// the block produces: the untaped time embedding or text states it re-tapes, and its
/// trainable parameters ([`trainable_params`]). `block` must be deterministic.
pub fn checkpoint<E, D, T, F>(
    x: Tensor4<D, T, E>,
    inputs: Vec<Tensor1<D, NoneTape, E>>,
    block: F,
) -> Tensor4<D, T, E>
where
    E: Elem,
    D: Device<E>,
    T: Tape<E, D>,
    F: Fn(Tensor4<D, RecomputeTape<D, E>, E>) -> Tensor4<D, RecomputeTape<D, E>, E> + 'static,
{
    if !T::OWNS_TAPE {
        let (x, tape) = x.split_tape();
        let (y, _) = block(x.leaky_trace()).split_tape();
        return y.put_tape(tape);
    }
    // The gradient buffer is indexed like the data: keep the saved input contiguous.
    let (x, mut tape) = x.contiguous().split_tape();
    // The block's own tape (and with it every activation) is dropped here.
    let (y, _) = block(x.clone().leaky_trace()).split_tape();
    let y_ghost = y.clone();
    tape.add_backward_op(move |grads| {
        grads.try_alloc_for(&y_ghost)?;
        let gy = grads.get(&y_ghost);
        let y2 = block(x.clone().leaky_trace());
        let mut inner = (y2 * gy).sum().backward();
        for t in std::iter::once(flat_view(&x)).chain(inputs.iter().cloned()) {
            inner.try_alloc_for(&t)?;
            let g = inner.get(&t);
            add_gradient(grads, &t, &g)?;
        }
        Ok(())
    });
    y.put_tape(tape)
}

/// A `[n]` view of contiguous `t` under the same id (so gradients land under `t`).
pub fn flat_view<S: Shape, E: Elem, D: Device<E>>(t: &Tensor<S, E, D>) -> Tensor1<D, NoneTape, E> {
    let n = t.shape().num_elements();
    t.clone().reshape_like(&(n,))
}

/// `grads[t] += g`.
fn add_gradient<E: Elem, D: Device<E>>(
    grads: &mut Gradients<E, D>,
    t: &Tensor1<D, NoneTape, E>,
    g: &Tensor1<D, NoneTape, E>,
) -> Result<(), D::Err> {
    if let Some(done) = E::host_add_gradient(grads, t, g) {
        return done;
    }
    // Other devices: through dfdx's own backward pass, whose ops add into existing gradients:
    // d/dt sum(t · g) = g. The product's and `g`'s gradient buffers (each the size of `t`)
    // stay in the map: two copies of every handed-back tensor, which the memory estimate
    // counts; a device kernel adding into the buffer in place would remove them.
    let outer = std::mem::replace(grads, Gradients::leaky());
    let loss = (t.clone().trace(outer) * g.clone()).sum();
    *grads = loss.try_backward()?;
    Ok(())
}

/// Flat views of the parameters of `model` that receive gradients under a tape: the weights
/// of trainable layers, LoRA adapters, and hypernetwork layers.
pub fn trainable_params<E: Elem, D: Device<E>>(
    model: &mut impl Layers<D, E>,
) -> Vec<Tensor1<D, NoneTape, E>> {
    let mut out = Vec::new();
    model.visit_layers("", &mut |_, layer| match layer {
        Layer::Linear(l) => {
            if l.trainable {
                out.push(flat_view(&l.weight));
                out.extend(l.bias.as_ref().map(flat_view));
            }
            if let Some(a) = &l.lora {
                out.push(flat_view(&a.down));
                out.push(flat_view(&a.up));
            }
        }
        Layer::Conv(l) => {
            if l.trainable {
                out.push(flat_view(&l.weight));
                out.extend(l.bias.as_ref().map(flat_view));
            }
            if let Some(a) = &l.lora {
                out.push(flat_view(&a.down));
                out.push(flat_view(&a.up));
            }
        }
        Layer::GroupNorm(l) => {
            if l.trainable {
                out.push(flat_view(&l.weight));
                out.push(flat_view(&l.bias));
            }
        }
        Layer::LayerNorm(l) => {
            if l.trainable {
                out.push(flat_view(&l.weight));
                out.push(flat_view(&l.bias));
            }
        }
        Layer::Embedding(_) => {}
    });
    out
}
