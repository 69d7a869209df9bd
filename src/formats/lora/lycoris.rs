//! The LyCORIS network modules beside plain LoRA, with the formulas, initialisation and key
//! names of the LyCORIS project (which kohya sd-scripts, A1111, ComfyUI and OneTrainer share):
//!
//! - **LoHa** (FedPara, Hyeon-Woo et al. 2022): `ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha/r`,
//!   keys `hada_w1_a [out, r]`, `hada_w1_b [r, in·kh·kw]`, `hada_w2_a`, `hada_w2_b`, `alpha`.
//! - **LoKr** (Yeh et al. 2023): `ΔW = (w1 ⊗ w2) · alpha/r` with `w1 [a, c]` and
//!   `w2 [b, d(, kh, kw)]` or its low-rank product `w2_a [b, r] · w2_b [r, d·kh·kw]`, where
//!   `out = a·b`, `in = c·d` split by LyCORIS' [`factorization`]; keys `lokr_w1`,
//!   `lokr_w2` / `lokr_w2_a` + `lokr_w2_b`, `alpha`. With both factors full the scale is 1.
//! - **DoRA** (Liu et al. 2024): a LoRA whose updated weight `V = W + alpha/r · up·down` is
//!   renormalised to a learned magnitude, `W' = V · m / ‖V‖`, the norm taken per input column
//!   over the output (and kernel) axes as LyCORIS, A1111 and ComfyUI do; key `dora_scale`
//!   (`[1, in]`, `[1, in, 1, 1]` for a conv) beside the LoRA's.
//!
//! A multiplier `μ` gives `W + μ·ΔW` (LoHa, LoKr) and `W + μ·(W' − W)` (DoRA, as ComfyUI
//! applies a strength to it).

use super::LoraModule;
use crate::formats::HostTensor;

/// `a [m, k] · b [k, n]` (row-major), optionally with `a` given transposed (`[k, m]`) or `b`
/// given transposed (`[n, k]`).
pub(crate) fn matmul(a: &[f32], b: &[f32], (m, k, n): (usize, usize, usize), t: Trans) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    let a_strides = if t.a { (1, m) } else { (k, 1) };
    let b_strides = if t.b { (1, k) } else { (n, 1) };
    crate::diffusion::nn::host::sgemm((m, n, k), a, a_strides, b, b_strides, &mut c, n, false);
    c
}

/// Which operands of [`matmul`] are given transposed.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Trans {
    /// `a` is stored `[k, m]`.
    pub a: bool,
    /// `b` is stored `[n, k]`.
    pub b: bool,
}

/// `t`'s rows: its first axis.
fn rows(t: &HostTensor) -> usize {
    t.shape.first().copied().unwrap_or(0)
}

/// `t`'s columns: the product of every axis after the first.
fn cols(t: &HostTensor) -> usize {
    t.numel().checked_div(rows(t)).unwrap_or(0)
}

/// Whether `shape` is the weight a module of `own` shape applies to: equal, or equal after
/// flattening the axes after the first (a file's 2-d factor of a conv layer).
pub fn fits(own: &[usize], shape: &[usize]) -> bool {
    own == shape
        || (own.first() == shape.first()
            && own[1..].iter().product::<usize>() == shape[1..].iter().product::<usize>())
}

/// LyCORIS' split of `dimension` into `(m, n)`, `m ≤ n`, `m·n = dimension`: `factor` itself
/// when it divides `dimension`, else the pair closest to a square whose smaller part does not
/// exceed `factor` (no limit for `factor < 0`).
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    let dimension = dimension.max(1);
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        let m = factor as usize;
        let n = dimension / m;
        return (m.min(n), m.max(n));
    }
    let factor = if factor < 0 {
        dimension
    } else {
        factor as usize
    };
    let (mut m, mut n) = (1usize, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > factor {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    (m.min(n), m.max(n))
}

/// A LoHa module: `ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha/r`.
#[derive(Debug, Clone, PartialEq)]
pub struct HadaModule {
    /// `[out, r]`
    pub w1_a: HostTensor,
    /// `[r, in·kh·kw]`
    pub w1_b: HostTensor,
    /// `[out, r]`
    pub w2_a: HostTensor,
    /// `[r, in·kh·kw]`
    pub w2_b: HostTensor,
    /// The network alpha (the update is scaled by `alpha / r`).
    pub alpha: f32,
    /// The weight it applies to, `[out, in]` or `[out, in, kh, kw]` (`[out, in·kh·kw]` when
    /// read from a file without the model at hand).
    pub shape: Vec<usize>,
}

impl HadaModule {
    /// A fresh module as LyCORIS initialises one: `w1_a ~ N(0, 0.1²)`, `w1_b`, `w2_b ~ N(0, 1)`,
    /// `w2_a = 0` (so the network starts as the identity). Deterministic for `seed`.
    pub fn init(shape: &[usize], rank: usize, alpha: f32, seed: u64) -> Result<Self, String> {
        check_shape(shape, rank, "LoHa")?;
        let (out, cols) = (shape[0], shape[1..].iter().product::<usize>());
        let mut rng = crate::formats::InitRng::new(seed);
        let w1_a = HostTensor {
            data: rng.normal(out * rank, 0.1),
            shape: vec![out, rank],
        };
        let w1_b = HostTensor {
            data: rng.normal(rank * cols, 1.0),
            shape: vec![rank, cols],
        };
        let w2_b = HostTensor {
            data: rng.normal(rank * cols, 1.0),
            shape: vec![rank, cols],
        };
        Ok(Self {
            w1_a,
            w1_b,
            w2_a: HostTensor::zeros(vec![out, rank]),
            w2_b,
            alpha,
            shape: shape.to_vec(),
        })
    }

    /// The rank (columns of `w1_a`).
    pub fn rank(&self) -> usize {
        cols(&self.w1_a)
    }

    /// `alpha / r`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank() as f32
    }

    /// `(w1_a·w1_b, w2_a·w2_b)`, each `[out, in·kh·kw]`.
    pub fn products(&self) -> (Vec<f32>, Vec<f32>) {
        let dims = (rows(&self.w1_a), self.rank(), cols(&self.w1_b));
        let p = matmul(&self.w1_a.data, &self.w1_b.data, dims, Trans::default());
        let q = matmul(&self.w2_a.data, &self.w2_b.data, dims, Trans::default());
        (p, q)
    }

    /// `μ · ΔW`, shaped like [`Self::shape`].
    pub fn delta(&self, multiplier: f32) -> HostTensor {
        let (p, q) = self.products();
        let s = multiplier * self.scale();
        HostTensor {
            data: p.iter().zip(&q).map(|(a, b)| a * b * s).collect(),
            shape: self.shape.clone(),
        }
    }

    /// Checks the factors fit each other; why not.
    pub fn validate(&self) -> Result<(), String> {
        let r = self.rank();
        let ok = self.w1_a.shape.len() == 2
            && self.w2_a.shape == self.w1_a.shape
            && self.w1_b.shape.len() == 2
            && self.w2_b.shape == self.w1_b.shape
            && rows(&self.w1_b) == r
            && r > 0;
        ok.then_some(()).ok_or_else(|| {
            format!(
                "hada_w1_a {:?} / hada_w1_b {:?} / hada_w2_a {:?} / hada_w2_b {:?} are not [out, r], [r, in], [out, r], [r, in]",
                self.w1_a.shape, self.w1_b.shape, self.w2_a.shape, self.w2_b.shape
            )
        })
    }
}

/// One factor of a LoKr module: a full matrix or a low-rank product.
#[derive(Debug, Clone, PartialEq)]
pub enum KronFactor {
    /// `[rows, cols(, kh, kw)]`
    Full(HostTensor),
    /// `a [rows, r] · b [r, cols·kh·kw]`
    LowRank {
        /// `[rows, r]`
        a: HostTensor,
        /// `[r, cols·kh·kw]`
        b: HostTensor,
    },
}

impl KronFactor {
    /// The factor as a `[rows, cols·kh·kw]` matrix.
    pub fn matrix(&self) -> (usize, usize, Vec<f32>) {
        match self {
            KronFactor::Full(t) => (rows(t), cols(t), t.data.clone()),
            KronFactor::LowRank { a, b } => {
                let dims = (rows(a), cols(a), cols(b));
                (
                    dims.0,
                    dims.2,
                    matmul(&a.data, &b.data, dims, Trans::default()),
                )
            }
        }
    }

    /// The rank of a low-rank factor.
    pub fn rank(&self) -> Option<usize> {
        match self {
            KronFactor::Full(_) => None,
            KronFactor::LowRank { a, .. } => Some(cols(a)),
        }
    }
}

/// A LoKr module: `ΔW = (w1 ⊗ w2) · scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct KronModule {
    /// The small factor `[a, c]` (`lokr_w1`, or `lokr_w1_a · lokr_w1_b`).
    pub w1: KronFactor,
    /// The large factor `[b, d(, kh, kw)]` (`lokr_w2`, or `lokr_w2_a · lokr_w2_b`).
    pub w2: KronFactor,
    /// The network alpha.
    pub alpha: f32,
    /// The weight it applies to (see [`HadaModule::shape`]).
    pub shape: Vec<usize>,
}

impl KronModule {
    /// A fresh module as LyCORIS builds one with its defaults (`decompose_both = false`):
    /// `out` and `in` split by [`factorization`] with `factor`; `w1 [a, c]` full,
    /// kaiming-uniform (a = √5); `w2 [b, d·kh·kw]` low-rank (`w2_a` kaiming-uniform, `w2_b`
    /// zero) when `rank < max(b, d)/2`, else full and zero (and `alpha` set to `rank`, as
    /// LyCORIS records it: the scale is then 1). Deterministic for `seed`.
    pub fn init(
        shape: &[usize],
        rank: usize,
        alpha: f32,
        factor: i64,
        seed: u64,
    ) -> Result<Self, String> {
        check_shape(shape, rank, "LoKr")?;
        let (out_a, out_b) = factorization(shape[0], factor);
        let (in_c, in_d) = factorization(shape[1], factor);
        let kernel: usize = shape[2..].iter().product();
        let mut rng = crate::formats::InitRng::new(seed);
        let mut kaiming = |r: usize, c: usize| HostTensor {
            data: rng.uniform(r * c, 1.0 / (c as f64).sqrt()),
            shape: vec![r, c],
        };
        let w1 = KronFactor::Full(kaiming(out_a, in_c));
        let w2 = if (rank as f64) < out_b.max(in_d) as f64 / 2.0 {
            KronFactor::LowRank {
                a: kaiming(out_b, rank),
                b: HostTensor::zeros(vec![rank, in_d * kernel]),
            }
        } else {
            let mut s = vec![out_b, in_d];
            s.extend_from_slice(&shape[2..]);
            KronFactor::Full(HostTensor::zeros(s))
        };
        // with both factors full the scale is 1, and LyCORIS records alpha = rank
        let alpha = if w2.rank().is_none() {
            rank as f32
        } else {
            alpha
        };
        Ok(Self {
            w1,
            w2,
            alpha,
            shape: shape.to_vec(),
        })
    }

    /// The rank whose `alpha / rank` scales the update (`w1`'s when decomposed, else `w2`'s),
    /// `None` when both factors are full (scale 1).
    pub fn rank(&self) -> Option<usize> {
        self.w1.rank().or(self.w2.rank())
    }

    /// `alpha / rank`, or 1 with both factors full.
    pub fn scale(&self) -> f32 {
        self.rank().map_or(1.0, |r| self.alpha / r as f32)
    }

    /// `μ · ΔW`, shaped like [`Self::shape`]; an error when the factors' sizes do not
    /// multiply to the weight's.
    pub fn delta(&self, multiplier: f32) -> Result<HostTensor, String> {
        let (a, c, w1) = self.w1.matrix();
        let (b, dk, w2) = self.w2.matrix();
        let out = self.shape[0];
        let cols: usize = self.shape[1..].iter().product();
        if a * b != out || c * dk != cols {
            return Err(format!(
                "w1 [{a}, {c}] ⊗ w2 [{b}, {dk}] does not make a {:?} weight",
                self.shape
            ));
        }
        // element [i·b + p, j·d + q, y, x] = w1[i, j] · w2[p, q, y, x]; with the kernel
        // flattened into w2's columns, column (j·d + q)·k + y·kw + x = j·dk + (q·k + …)
        let s = multiplier * self.scale();
        let mut data = vec![0.0f32; out * cols];
        for i in 0..a {
            for p in 0..b {
                let row = &mut data[(i * b + p) * cols..(i * b + p + 1) * cols];
                let w2_row = &w2[p * dk..(p + 1) * dk];
                for j in 0..c {
                    let f = w1[i * c + j] * s;
                    for (o, v) in row[j * dk..(j + 1) * dk].iter_mut().zip(w2_row) {
                        *o = f * v;
                    }
                }
            }
        }
        Ok(HostTensor {
            data,
            shape: self.shape.clone(),
        })
    }
}

/// A DoRA module: a LoRA with a learned magnitude per input column.
#[derive(Debug, Clone, PartialEq)]
pub struct DoraModule {
    /// The direction's low-rank update.
    pub lora: LoraModule,
    /// `[1, in]` (`[1, in, 1, 1]` for a conv): `‖W‖` per input column at the start.
    pub magnitude: HostTensor,
}

/// The norm of every input column of `v` (`[out, in, …]`): over the output and kernel axes,
/// plus f32's epsilon as LyCORIS and ComfyUI add it.
pub fn column_norms(v: &[f32], shape: &[usize]) -> Vec<f32> {
    let (out, inp) = (shape[0], shape.get(1).copied().unwrap_or(1));
    let k: usize = shape.iter().skip(2).product();
    let mut sq = vec![0.0f64; inp];
    for o in 0..out {
        for (j, acc) in sq.iter_mut().enumerate() {
            let base = (o * inp + j) * k;
            *acc += v[base..base + k]
                .iter()
                .map(|x| f64::from(*x) * f64::from(*x))
                .sum::<f64>();
        }
    }
    sq.into_iter()
        .map(|s| s.sqrt() as f32 + f32::EPSILON)
        .collect()
}

impl DoraModule {
    /// A fresh module: the LoRA of [`LoraModule::init`] and the magnitude `‖W‖` of `weight`'s
    /// columns (so the network starts as the identity).
    pub fn init(weight: &HostTensor, rank: usize, alpha: f32, seed: u64) -> Result<Self, String> {
        let lora = LoraModule::init(&weight.shape, rank, alpha, seed)?;
        let mut shape = vec![1, weight.shape[1]];
        shape.extend(std::iter::repeat_n(1, weight.shape.len() - 2));
        let norms = column_norms(&weight.data, &weight.shape);
        Ok(Self {
            lora,
            magnitude: HostTensor {
                shape,
                data: norms.iter().map(|n| n - f32::EPSILON).collect(),
            },
        })
    }

    /// `(V, scale)` for the base weight `w`: `V = W + alpha/r · up·down` and the factor
    /// `m / ‖V‖` of each input column.
    pub fn direction(&self, w: &HostTensor) -> Result<(Vec<f32>, Vec<f32>), String> {
        if w.shape != self.lora.weight_shape() || self.magnitude.numel() != w.shape[1] {
            return Err(format!(
                "DoRA module (down {:?}, up {:?}, dora_scale {:?}) does not fit a {:?} weight",
                self.lora.down.shape, self.lora.up.shape, self.magnitude.shape, w.shape
            ));
        }
        let d = self.lora.delta(1.0);
        let v: Vec<f32> = w.data.iter().zip(&d.data).map(|(a, b)| a + b).collect();
        let norms = column_norms(&v, &w.shape);
        let scale = (self.magnitude.data.iter().zip(&norms))
            .map(|(m, n)| m / n)
            .collect();
        Ok((v, scale))
    }

    /// `μ · (W' − W)` for the base weight `w`, `W' = V · m / ‖V‖`.
    pub fn delta(&self, w: &HostTensor, multiplier: f32) -> Result<HostTensor, String> {
        let (v, scale) = self.direction(w)?;
        let inp = w.shape[1];
        let k: usize = w.shape[2..].iter().product();
        let data = (v.iter().zip(&w.data).enumerate())
            .map(|(idx, (v, w))| multiplier * (v * scale[(idx / k) % inp] - w))
            .collect();
        Ok(HostTensor {
            data,
            shape: w.shape.clone(),
        })
    }
}

/// Checks a weight shape and rank can take a module of `kind`.
fn check_shape(shape: &[usize], rank: usize, kind: &str) -> Result<(), String> {
    if !(shape.len() == 2 || shape.len() == 4) || rank == 0 || shape.contains(&0) {
        return Err(format!(
            "cannot make a rank-{rank} {kind} module for a weight of shape {shape:?}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], data: &[f32]) -> HostTensor {
        HostTensor {
            shape: shape.to_vec(),
            data: data.to_vec(),
        }
    }

    #[test]
    fn factorization_matches_lycoris() {
        // values from LyCORIS' factorization(dim, -1) and (dim, 8)
        assert_eq!(factorization(320, -1), (16, 20));
        assert_eq!(factorization(768, -1), (24, 32));
        assert_eq!(factorization(1280, -1), (32, 40));
        assert_eq!(factorization(32, -1), (4, 8));
        assert_eq!(factorization(7, -1), (1, 7));
        assert_eq!(factorization(320, 8), (8, 40));
        assert_eq!(factorization(320, 16), (16, 20));
        assert_eq!(factorization(100, 3), (2, 50));
    }

    #[test]
    fn kron_delta_is_the_kronecker_product() {
        let m = KronModule {
            w1: KronFactor::Full(t(&[2, 1], &[1.0, 2.0])),
            w2: KronFactor::Full(t(&[1, 2], &[3.0, 4.0])),
            alpha: 7.0, // ignored: both factors full
            shape: vec![2, 2],
        };
        assert_eq!(m.delta(1.0).unwrap().data, vec![3.0, 4.0, 6.0, 8.0]);
        // [[1, 2]] ⊗ [[1], [10]] = [[1, 2], [10, 20]], low-rank w2 of rank 1 scaled by alpha
        let m = KronModule {
            w1: KronFactor::Full(t(&[1, 2], &[1.0, 2.0])),
            w2: KronFactor::LowRank {
                a: t(&[2, 1], &[1.0, 10.0]),
                b: t(&[1, 1], &[1.0]),
            },
            alpha: 0.5,
            shape: vec![2, 2],
        };
        assert_eq!(m.delta(2.0).unwrap().data, vec![1.0, 2.0, 10.0, 20.0]);
    }

    #[test]
    fn hada_delta_is_the_hadamard_product() {
        let m = HadaModule {
            w1_a: t(&[2, 1], &[1.0, 2.0]),
            w1_b: t(&[1, 2], &[3.0, 4.0]),
            w2_a: t(&[2, 1], &[1.0, -1.0]),
            w2_b: t(&[1, 2], &[0.5, 1.0]),
            alpha: 2.0,
            shape: vec![2, 2],
        };
        // P = [[3, 4], [6, 8]], Q = [[.5, 1], [-.5, -1]], scale 2
        assert_eq!(m.delta(1.0).data, vec![3.0, 8.0, -6.0, -16.0]);
    }

    #[test]
    fn fresh_modules_start_as_the_identity() {
        let w = t(
            &[4, 3],
            &[1.0, -2.0, 0.5, 3.0, 1.0, 1.0, 0.0, 2.0, -1.0, 1.0, 1.0, 2.0],
        );
        let d = DoraModule::init(&w, 2, 2.0, 1).unwrap();
        assert!(
            d.delta(&w, 1.0)
                .unwrap()
                .data
                .iter()
                .all(|v| v.abs() < 1e-6)
        );
        assert!(
            HadaModule::init(&[4, 3, 3, 3], 2, 1.0, 1)
                .unwrap()
                .delta(1.0)
                .data
                .iter()
                .all(|v| *v == 0.0)
        );
        let k = KronModule::init(&[320, 768], 4, 1.0, -1, 1).unwrap();
        assert!(matches!(k.w2, KronFactor::LowRank { .. }));
        assert!(k.delta(1.0).unwrap().data.iter().all(|v| *v == 0.0));
        assert!(HadaModule::init(&[4], 2, 1.0, 1).is_err());
    }

    #[test]
    fn dora_renormalises_each_input_column() {
        // W = I (2×2), LoRA adds 1 to W[0, 1]: V = [[1, 1], [0, 1]], ‖V_:,0‖ = 1, ‖V_:,1‖ = √2
        let w = t(&[2, 2], &[1.0, 0.0, 0.0, 1.0]);
        let d = DoraModule {
            lora: LoraModule {
                down: t(&[1, 2], &[0.0, 1.0]),
                up: t(&[2, 1], &[1.0, 0.0]),
                alpha: 1.0,
            },
            magnitude: t(&[1, 2], &[2.0, 1.0]),
        };
        let got = d.delta(&w, 1.0).unwrap().data;
        let r = std::f32::consts::FRAC_1_SQRT_2;
        let want = [2.0 - 1.0, r, 0.0, r - 1.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
    }
}
