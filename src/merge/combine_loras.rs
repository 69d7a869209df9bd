//! Several LoRA networks (each with a weight) combined into one.
//!
//! * [`CombineMethod::Concat`]: per module, the ranks are stacked — `down = [down₁; down₂; …]`,
//!   `up = [w₁s₁·up₁ | w₂s₂·up₂ | …]` (`sᵢ = alphaᵢ/rankᵢ`), `alpha = Σ rankᵢ` — so the update is
//!   exactly `Σ wᵢ·sᵢ·upᵢ·downᵢ`, at the cost of a larger rank.
//! * [`CombineMethod::Svd`]: per module, the summed update is factorised to a target rank
//!   (kohya's `svd_merge_lora`: `up = U·S`, `down = Vᵀ`, optional quantile clamp): a small file
//!   whose error is the tail of the update's singular values.

use std::collections::BTreeMap;

use super::svd::{clamp_quantile, low_rank};
use super::{MergeError, Result};
use crate::formats::HostTensor;
use crate::formats::lora::{LoraComponent, LoraModule, LoraNetwork};

/// How [`combine_loras`] combines.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CombineMethod {
    /// Stack the ranks (exact).
    Concat,
    /// SVD of the summed update to `rank` (`conv_rank` for 3x3 conv modules, default `rank`);
    /// `alpha` (default `rank`) sets the stored scale; values beyond the `clamp_quantile`
    /// quantile of the factors are clamped (kohya: 0.99; 1 disables).
    Svd {
        /// Rank of linear (and 1x1 conv) modules.
        rank: usize,
        /// Rank of kxk conv modules (k > 1).
        conv_rank: Option<usize>,
        /// Network alpha of the result (default: the module's rank, i.e. scale 1).
        alpha: Option<f32>,
        /// kohya's outlier clamp quantile.
        clamp_quantile: f32,
        /// Seed of the randomised SVD of large updates.
        seed: u64,
    },
}

/// One network's module: (network index, module, weight).
type Part<'a> = (usize, &'a LoraModule, f32);

/// Checks that every network's module `path` updates the same weight shape.
fn module_shape(path: &str, parts: &[(usize, &LoraModule, f32)]) -> Result<Vec<usize>> {
    let (i0, first, _) = parts[0];
    let shape = first.weight_shape();
    for (i, m, _) in &parts[1..] {
        let s = m.weight_shape();
        if s != shape {
            return Err(MergeError::ShapeMismatch {
                name: path.to_string(),
                what: format!("LoRA {}", i0 + 1),
                a: shape,
                other: format!("LoRA {}", i + 1),
                b: s,
            });
        }
    }
    Ok(shape)
}

/// Combines `(network, weight)` pairs into one network by `method`. Modules present in only
/// some networks are combined from those. The networks' module shapes must agree.
pub fn combine_loras(loras: &[(&LoraNetwork, f32)], method: CombineMethod) -> Result<LoraNetwork> {
    if loras.is_empty() {
        return Err(MergeError::Invalid("no LoRA to combine".into()));
    }
    if let CombineMethod::Svd { rank: 0, .. } = method {
        return Err(MergeError::Invalid(
            "the target rank must be at least 1".into(),
        ));
    }
    let mut by_module: BTreeMap<(LoraComponent, &String), Vec<Part>> = BTreeMap::new();
    for (i, (net, w)) in loras.iter().enumerate() {
        let modules = net.lora_modules().map_err(MergeError::Invalid)?;
        for (c, path, m) in modules {
            by_module.entry((c, path)).or_default().push((i, m, *w));
        }
    }
    let mut out = LoraNetwork::default();
    for ((component, path), parts) in by_module {
        let shape = module_shape(path, &parts)?;
        let module = match method {
            CombineMethod::Concat => concat(&shape, &parts),
            CombineMethod::Svd {
                rank,
                conv_rank,
                alpha,
                clamp_quantile: q,
                seed,
            } => {
                let is_kxk = shape.len() == 4 && (shape[2] > 1 || shape[3] > 1);
                let r = if is_kxk {
                    conv_rank.unwrap_or(rank)
                } else {
                    rank
                };
                let mut delta = HostTensor::zeros(shape.clone());
                for (_, m, w) in &parts {
                    for (d, v) in delta.data.iter_mut().zip(m.delta(*w).data) {
                        *d += v;
                    }
                }
                factorise(&delta, r, alpha, q, seed)
            }
        };
        match component {
            LoraComponent::Unet => out.unet.insert(path.clone(), module.into()),
            LoraComponent::TextEncoder => out.text_encoder.insert(path.clone(), module.into()),
        };
    }
    Ok(out)
}

fn concat(shape: &[usize], parts: &[(usize, &LoraModule, f32)]) -> LoraModule {
    let out = shape[0];
    let total: usize = parts.iter().map(|(_, m, _)| m.rank()).sum();
    let mut down_data = Vec::new();
    let mut up_data = vec![0.0f32; out * total];
    let mut col = 0;
    for (_, m, w) in parts {
        let r = m.rank();
        let s = w * m.scale();
        down_data.extend_from_slice(&m.down.data);
        for o in 0..out {
            for k in 0..r {
                up_data[o * total + col + k] = s * m.up.data[o * r + k];
            }
        }
        col += r;
    }
    let mut down_shape = vec![total];
    down_shape.extend_from_slice(&shape[1..]);
    LoraModule {
        down: HostTensor {
            shape: down_shape,
            data: down_data,
        },
        up: HostTensor {
            shape: vec![out, total],
            data: up_data,
        },
        // alpha = rank: scale 1, the weights and scales live in `up`
        alpha: total as f32,
    }
}

/// The rank-`rank` module whose update best approximates `delta` (`[out, in(, kh, kw)]`):
/// `up = U·S·(rank/alpha)`, `down = Vᵀ`, so that `alpha/rank · up·down ≈ delta`.
pub(crate) fn factorise(
    delta: &HostTensor,
    rank: usize,
    alpha: Option<f32>,
    clamp: f32,
    seed: u64,
) -> LoraModule {
    let rows = delta.shape[0];
    let cols = delta.numel() / rows.max(1);
    let lr = low_rank(&delta.data, rows, cols, rank, seed);
    let r = lr.up.shape[1];
    let (mut up, mut down) = (lr.up, lr.down);
    clamp_quantile(&mut up, &mut down, clamp);
    let alpha = alpha.unwrap_or(r as f32);
    let fix = r as f32 / alpha;
    if fix != 1.0 {
        up.data.iter_mut().for_each(|v| *v *= fix);
    }
    let mut down_shape = vec![r];
    down_shape.extend_from_slice(&delta.shape[1..]);
    down.shape = down_shape;
    LoraModule { down, up, alpha }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(seed: u64, rank: usize, alpha: f32) -> LoraNetwork {
        let mut n = LoraNetwork::default();
        for (i, shape) in [vec![6usize, 5], vec![4, 3, 3, 3]].into_iter().enumerate() {
            let mut m = LoraModule::init(&shape, rank, alpha, seed + i as u64).unwrap();
            m.up.data =
                crate::formats::InitRng::new(seed + 100 + i as u64).normal(m.up.numel(), 1.0);
            n.unet.insert(format!("m{i}"), m.into());
        }
        n
    }

    fn summed(loras: &[(&LoraNetwork, f32)], module: &str) -> HostTensor {
        let mut total: Option<HostTensor> = None;
        for (n, w) in loras {
            let d = n.unet[module].as_lora().unwrap().delta(*w);
            match &mut total {
                None => total = Some(d),
                Some(t) => t.data.iter_mut().zip(d.data).for_each(|(a, b)| *a += b),
            }
        }
        total.unwrap()
    }

    #[test]
    fn concat_is_exactly_the_sum_of_deltas() {
        let (a, b) = (net(1, 2, 1.0), net(7, 3, 3.0));
        let loras = [(&a, 0.7f32), (&b, -0.4)];
        let c = combine_loras(&loras, CombineMethod::Concat).unwrap();
        for m in ["m0", "m1"] {
            assert_eq!(c.unet[m].rank(), 5);
            let err = c.unet[m]
                .as_lora()
                .unwrap()
                .delta(1.0)
                .max_abs_diff(&summed(&loras, m));
            assert!(err < 1e-6, "{m}: {err}");
        }
    }

    #[test]
    fn svd_at_full_rank_reconstructs_and_low_rank_error_is_the_tail() {
        let (a, b) = (net(1, 2, 1.0), net(7, 3, 3.0));
        let loras = [(&a, 0.7f32), (&b, -0.4)];
        let svd = |rank, alpha| CombineMethod::Svd {
            rank,
            conv_rank: None,
            alpha,
            clamp_quantile: 1.0,
            seed: 0,
        };
        // the sum has rank ≤ 5: rank 5 is exact, with any alpha
        for alpha in [None, Some(1.0)] {
            let c = combine_loras(&loras, svd(5, alpha)).unwrap();
            for m in ["m0", "m1"] {
                let err = c.unet[m]
                    .as_lora()
                    .unwrap()
                    .delta(1.0)
                    .max_abs_diff(&summed(&loras, m));
                assert!(err < 1e-5, "{m}: {err}");
            }
        }
        // rank 2: the Frobenius error is the tail of the singular values
        let c = combine_loras(&loras, svd(2, None)).unwrap();
        let full = summed(&loras, "m0");
        let s = low_rank(&full.data, 6, 5, 5, 0).singular_values;
        let got = c.unet["m0"].as_lora().unwrap().delta(1.0);
        let err: f64 = got
            .data
            .iter()
            .zip(&full.data)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let tail = s[2..].iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((err - tail).abs() < 1e-4, "{err} vs {tail}");
        println!("rank-2 SVD combine: error {err:.6}, singular value tail {tail:.6}");
    }

    #[test]
    fn mismatched_module_shapes_are_named() {
        let a = net(1, 2, 1.0);
        let mut b = LoraNetwork::default();
        b.unet.insert(
            "m0".into(),
            LoraModule::init(&[6, 7], 2, 1.0, 0).unwrap().into(),
        );
        let err = combine_loras(&[(&a, 1.0), (&b, 1.0)], CombineMethod::Concat)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`m0`") && err.contains("[6, 7]"), "{err}");
    }
}
