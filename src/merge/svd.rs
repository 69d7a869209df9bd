//! Truncated SVD of a weight update, `A ≈ up · down` with `up = U_r · S_r` (`[m, r]`) and
//! `down = V_rᵀ` (`[r, n]`), kohya's convention. Small matrices (or ranks close to full) take
//! nalgebra's exact SVD in f64; large ones a randomised range finder (Halko, Martinsson &
//! Tropp 2011: Gaussian sketch with 10 extra columns and two power iterations, seeded, so the
//! result is deterministic) followed by the exact SVD of the small projected matrix. SD 1.5's
//! largest updates (1280 × 11520 for a 3x3 conv) then cost a few matrix products.

use nalgebra::DMatrix;

use crate::formats::HostTensor;

/// Columns added to the sketch beyond the target rank.
const OVERSAMPLE: usize = 10;
/// Power iterations of the range finder (sharpen the spectrum of slowly decaying updates).
const POWER_ITERATIONS: usize = 2;
/// Below this smaller dimension the exact SVD is cheap enough.
const EXACT_BELOW: usize = 320;

/// A rank-`r` factorisation `up · down` of a matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRank {
    /// `U_r · diag(S_r)`, `[m, r]`.
    pub up: HostTensor,
    /// `V_rᵀ`, `[r, n]`.
    pub down: HostTensor,
    /// Every singular value computed, descending (all `min(m, n)` of them when the exact SVD
    /// was used, else the sketch's).
    pub singular_values: Vec<f64>,
    /// Whether the exact SVD was used.
    pub exact: bool,
}

/// The best rank-`rank` approximation of the row-major `[rows, cols]` matrix `data`
/// (`rank` is capped at `min(rows, cols)`). `seed` drives the random sketch of large matrices.
pub fn low_rank(data: &[f32], rows: usize, cols: usize, rank: usize, seed: u64) -> LowRank {
    let full = rows.min(cols);
    let rank = rank.min(full).max(1);
    let a = DMatrix::<f64>::from_iterator(cols, rows, data.iter().map(|&v| v as f64)).transpose();
    let sketch = rank + OVERSAMPLE;
    let (u, s, vt, exact) = if full <= EXACT_BELOW || 2 * sketch >= full {
        let svd = a.svd(true, true);
        let (Some(u), Some(vt)) = (svd.u, svd.v_t) else {
            unreachable!("nalgebra computes U and Vᵀ when asked to")
        };
        (u, svd.singular_values, vt, true)
    } else {
        // range finder: Q with orthonormal columns spanning A's dominant column space
        let omega: Vec<f64> = crate::formats::InitRng::new(seed ^ 0x5bd1_e995)
            .normal(cols * sketch, 1.0)
            .into_iter()
            .map(f64::from)
            .collect();
        let omega = DMatrix::from_vec(cols, sketch, omega);
        let mut q = (&a * omega).qr().q(); // [m, l]
        for _ in 0..POWER_ITERATIONS {
            let z = (a.transpose() * &q).qr().q(); // [n, l]
            q = (&a * z).qr().q();
        }
        let b = q.transpose() * &a; // [l, n]
        let svd = b.svd(true, true);
        let (Some(ub), Some(vt)) = (svd.u, svd.v_t) else {
            unreachable!("nalgebra computes U and Vᵀ when asked to")
        };
        (q * ub, svd.singular_values, vt, false)
    };
    let mut up = Vec::with_capacity(rows * rank);
    for i in 0..rows {
        for k in 0..rank {
            up.push((u[(i, k)] * s[k]) as f32);
        }
    }
    let mut down = Vec::with_capacity(rank * cols);
    for k in 0..rank {
        for j in 0..cols {
            down.push(vt[(k, j)] as f32);
        }
    }
    LowRank {
        up: HostTensor {
            shape: vec![rows, rank],
            data: up,
        },
        down: HostTensor {
            shape: vec![rank, cols],
            data: down,
        },
        singular_values: s.iter().copied().collect(),
        exact,
    }
}

/// The `q`-quantile of `values` with linear interpolation between order statistics (as
/// `torch.quantile` computes it). `None` for no values.
pub fn quantile(values: &[f32], q: f32) -> Option<f32> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f32::total_cmp);
    let pos = q.clamp(0.0, 1.0) as f64 * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    Some(v[lo] + (v[hi] - v[lo]) * (pos - lo as f64) as f32)
}

/// kohya's outlier clamp: `h` = the `q`-quantile of all values of `up` and `down` together,
/// then both are clamped to `[-h, h]`. `q >= 1` leaves them unchanged.
pub fn clamp_quantile(up: &mut HostTensor, down: &mut HostTensor, q: f32) {
    if q >= 1.0 {
        return;
    }
    let all: Vec<f32> = up.data.iter().chain(&down.data).copied().collect();
    let Some(h) = quantile(&all, q) else {
        return;
    };
    let h = h.abs();
    for v in up.data.iter_mut().chain(down.data.iter_mut()) {
        *v = v.clamp(-h, h);
    }
}

/// `up · down` for `up: [m, r]`, `down: [r, n]` (row-major), as a flat `[m, n]`.
pub fn product(up: &HostTensor, down: &HostTensor) -> Vec<f32> {
    let (m, r) = (up.shape[0], up.shape[1]);
    let n = down.numel() / r.max(1);
    let mut out = vec![0.0f32; m * n];
    for i in 0..m {
        let row = &mut out[i * n..(i + 1) * n];
        for k in 0..r {
            let u = up.data[i * r + k];
            for (o, d) in row.iter_mut().zip(&down.data[k * n..(k + 1) * n]) {
                *o += u * d;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frobenius(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    fn random(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        crate::formats::InitRng::new(seed).normal(rows * cols, 1.0)
    }

    #[test]
    fn full_rank_reconstructs_and_truncation_error_is_the_singular_value_tail() {
        for (rows, cols) in [(12, 7), (7, 12), (40, 40)] {
            let a = random(rows, cols, 3);
            let full = low_rank(&a, rows, cols, rows.min(cols), 0);
            assert!(full.exact);
            let err = frobenius(&product(&full.up, &full.down), &a);
            assert!(err < 1e-4, "{rows}x{cols}: full-rank error {err}");
            let s = &full.singular_values;
            assert!(s.windows(2).all(|w| w[0] >= w[1]), "sorted descending");
            for r in [1, 3, 5] {
                let lr = low_rank(&a, rows, cols, r, 0);
                let err = frobenius(&product(&lr.up, &lr.down), &a);
                let tail = s[r..].iter().map(|v| v * v).sum::<f64>().sqrt();
                assert!((err - tail).abs() < 1e-4 * tail.max(1.0), "{err} vs {tail}");
            }
        }
    }

    #[test]
    fn randomised_svd_finds_a_low_rank_matrix_exactly_and_is_deterministic() {
        // a rank-6 400 x 700 matrix plus tiny noise: the sketch must recover it
        let (m, n, r) = (400, 700, 6);
        let u = random(m, r, 1);
        let v = random(r, n, 2);
        let mut a = product(
            &HostTensor::new(vec![m, r], u).unwrap(),
            &HostTensor::new(vec![r, n], v).unwrap(),
        );
        for (x, e) in a.iter_mut().zip(random(m, n, 9)) {
            *x += 1e-4 * e;
        }
        let lr = low_rank(&a, m, n, r, 7);
        assert!(!lr.exact);
        let norm = frobenius(&a, &vec![0.0; a.len()]);
        let err = frobenius(&product(&lr.up, &lr.down), &a) / norm;
        assert!(err < 1e-4, "relative error {err}");
        assert_eq!(lr, low_rank(&a, m, n, r, 7));
    }

    /// On a slowly decaying spectrum (σ_k = 1/k, like a fine-tuning update) the randomised
    /// factorisation is within 1% of the optimal (exact) truncation error.
    #[test]
    fn randomised_svd_is_near_optimal_on_a_slow_spectrum() {
        let (m, n, r) = (360, 500, 16);
        let q1 = DMatrix::from_vec(m, m, random(m, m, 4).iter().map(|&v| v as f64).collect())
            .qr()
            .q();
        let q2 = DMatrix::from_vec(n, m, random(n, m, 5).iter().map(|&v| v as f64).collect())
            .qr()
            .q(); // [n, m]
        let s = DMatrix::from_diagonal(&nalgebra::DVector::from_fn(m, |k, _| 1.0 / (k + 1) as f64));
        let a = q1 * s * q2.transpose(); // [m, n]
        let data: Vec<f32> = (0..m)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .map(|(i, j)| a[(i, j)] as f32)
            .collect();
        let lr = low_rank(&data, m, n, r, 0);
        assert!(!lr.exact);
        let err = frobenius(&product(&lr.up, &lr.down), &data);
        let optimal = (r..m)
            .map(|k| 1.0 / ((k + 1) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        println!("randomised rank-{r} error {err:.5} vs optimal {optimal:.5}");
        assert!(err <= 1.01 * optimal, "{err} vs {optimal}");
    }

    #[test]
    fn quantile_interpolates_like_torch_and_clamp_is_symmetric() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.5), Some(2.5));
        assert_eq!(quantile(&v, 1.0), Some(4.0));
        assert!((quantile(&v, 0.99).unwrap() - 3.97).abs() < 1e-6);
        let mut up = HostTensor::new(vec![2, 2], vec![-10.0, 1.0, 2.0, 3.0]).unwrap();
        let mut down = HostTensor::new(vec![2, 1], vec![0.5, 100.0]).unwrap();
        clamp_quantile(&mut up, &mut down, 0.5);
        // median of [-10, 0.5, 1, 2, 3, 100] = 1.5
        assert_eq!(up.data, vec![-1.5, 1.0, 1.5, 1.5]);
        assert_eq!(down.data, vec![0.5, 1.5]);
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// SD 1.5's largest LoRA-able shapes; run with `--ignored --nocapture` to see the cost.
    #[test]
    #[ignore]
    fn sd15_sizes() {
        for (m, n, r) in [
            (320, 768, 32),
            (1280, 1280, 32),
            (1280, 5120, 32),
            (1280, 11520, 32),
        ] {
            let a = crate::formats::InitRng::new(1).normal(m * n, 0.01);
            let t = std::time::Instant::now();
            let lr = low_rank(&a, m, n, r, 0);
            println!(
                "{m}x{n} rank {r}: {:.2} s ({})",
                t.elapsed().as_secs_f64(),
                if lr.exact { "exact" } else { "randomised" }
            );
        }
    }
}
