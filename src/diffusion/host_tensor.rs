//! [`HostTensor`]: a row-major f32 tensor in host memory, what the file formats read and write
//! and what model code turns into device tensors.

use dfdx::prelude::{Device, HasShape, Shape, Tensor};

use crate::diffusion::nn::elem::{Elem, elems, to_f32_vec};

/// A row-major f32 tensor in host memory, the exchange type of the file formats.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first (`[]` for a scalar).
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values in row-major order.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A tensor from its shape and data; `None` when the lengths disagree.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Option<Self> {
        (shape.iter().product::<usize>() == data.len()).then_some(Self { shape, data })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self {
            shape,
            data: vec![0.0; n],
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Little-endian bytes of the data (the layout safetensors and torch storages use).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.data.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// Copies a dfdx tensor (of any shape and device) to the host.
    pub fn from_tensor<S: Shape, E: Elem, D: Device<E>, T>(t: &Tensor<S, E, D, T>) -> Self {
        let dims = t.shape().concrete();
        Self {
            shape: (0..S::NUM_DIMS).map(|i| dims[i]).collect(),
            data: to_f32_vec(t),
        }
    }

    /// A dfdx tensor of shape type `S` on `dev` (e.g. `(usize, usize)`), or `None` when the
    /// rank (or a compile-time dimension) differs.
    pub fn to_tensor<S: Shape, D: Device<f32>>(&self, dev: &D) -> Option<Tensor<S, f32, D>> {
        self.to_tensor_as(dev)
    }

    /// [`HostTensor::to_tensor`] in element type `E` (values rounded to it).
    pub fn to_tensor_as<S: Shape, E: Elem, D: Device<E>>(
        &self,
        dev: &D,
    ) -> Option<Tensor<S, E, D>> {
        if self.shape.len() != S::NUM_DIMS {
            return None;
        }
        let mut dims = S::Concrete::default();
        for (i, &d) in self.shape.iter().enumerate() {
            dims[i] = d;
        }
        let shape = S::from_concrete(&dims)?;
        Some(dev.tensor_from_vec(elems(self.data.clone()), shape))
    }

    /// Largest absolute elementwise difference to `other` (infinite if shapes differ).
    pub fn max_abs_diff(&self, other: &HostTensor) -> f32 {
        if self.shape != other.shape {
            return f32::INFINITY;
        }
        self.data
            .iter()
            .zip(&other.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }
}
