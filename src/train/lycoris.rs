//! Training the LyCORIS modules (LoHa, LoKr) and DoRA. Each acts on its layer as a full-size
//! update `ΔW` ([`Linear::delta`](crate::diffusion::nn::Linear::delta),
//! [`Conv2d::delta`](crate::diffusion::nn::Conv2d::delta)) that the trainer rebuilds from the
//! module's factors before every step; after the backward pass the gradient of `ΔW` is carried
//! back to the factors here, on the host, by the chain rule of each formula (as LyCORIS' own
//! `HadaWeight.backward` does for LoHa).
//!
//! DoRA's column norm `‖V‖` is treated as a constant in the backward pass, as the DoRA paper
//! (§4.3) and PEFT do: the gradient reaches the magnitude and the LoRA through `V`, not
//! through the norm.

use crate::formats::HostTensor;
use crate::formats::lora::{
    DoraModule, HadaModule, KronFactor, KronModule, NetworkModule, Trans, column_norms, matmul,
};

/// The gradient of every trained tensor of `module` (by the names of
/// [`NetworkModule::params`], shaped like them) from `g`, the gradient of its `ΔW` (shaped like
/// the layer's weight). `weight` is the layer's frozen weight (DoRA needs it). Plain LoRA
/// modules train through their own adapter and are not handled here.
pub fn factor_grads(
    module: &NetworkModule,
    weight: &HostTensor,
    g: &HostTensor,
) -> Result<Vec<(&'static str, HostTensor)>, String> {
    if g.numel() != weight.numel() {
        return Err(format!(
            "ΔW gradient of shape {:?} for a {:?} weight",
            g.shape, weight.shape
        ));
    }
    match module {
        NetworkModule::Lora(_) => Err("a LoRA module trains through its adapter".into()),
        NetworkModule::Hada(m) => Ok(hada_grads(m, &g.data)),
        NetworkModule::Kron(m) => kron_grads(m, &g.data),
        NetworkModule::Dora(m) => dora_grads(m, weight, &g.data),
    }
}

/// `values` shaped like `like`.
fn like(like: &HostTensor, data: Vec<f32>) -> HostTensor {
    HostTensor {
        shape: like.shape.clone(),
        data,
    }
}

/// `a [rows, r]`, `b [r, cols]` → the gradients of `a` and `b` from `d(a·b) [rows, cols]`.
fn product_grads(a: &HostTensor, b: &HostTensor, d: &[f32]) -> (HostTensor, HostTensor) {
    let (rows, r) = (a.shape[0], a.shape[1]);
    let cols = b.numel() / r.max(1);
    // d·bᵀ: [rows, cols] x [cols, r]; aᵀ·d: [r, rows] x [rows, cols]
    let da = matmul(d, &b.data, (rows, cols, r), Trans { a: false, b: true });
    let db = matmul(&a.data, d, (r, rows, cols), Trans { a: true, b: false });
    (like(a, da), like(b, db))
}

/// LoHa: `ΔW = s·(P ⊙ Q)`, `P = w1_a·w1_b`, `Q = w2_a·w2_b`: `dP = s·G ⊙ Q`, `dQ = s·G ⊙ P`.
fn hada_grads(m: &HadaModule, g: &[f32]) -> Vec<(&'static str, HostTensor)> {
    let (p, q) = m.products();
    let s = m.scale();
    let dp: Vec<f32> = g.iter().zip(&q).map(|(g, q)| s * g * q).collect();
    let dq: Vec<f32> = g.iter().zip(&p).map(|(g, p)| s * g * p).collect();
    let (d1a, d1b) = product_grads(&m.w1_a, &m.w1_b, &dp);
    let (d2a, d2b) = product_grads(&m.w2_a, &m.w2_b, &dq);
    vec![
        ("hada_w1_a", d1a),
        ("hada_w1_b", d1b),
        ("hada_w2_a", d2a),
        ("hada_w2_b", d2b),
    ]
}

/// LoKr: `ΔW[i·b + p, j·dk + q] = s·w1[i, j]·w2[p, q]`.
fn kron_grads(m: &KronModule, g: &[f32]) -> Result<Vec<(&'static str, HostTensor)>, String> {
    let (a, c, w1) = m.w1.matrix();
    let (b, dk, w2) = m.w2.matrix();
    let cols = c * dk;
    if a * b * cols != g.len() {
        return Err(format!(
            "w1 [{a}, {c}] ⊗ w2 [{b}, {dk}] does not fit a gradient of {} values",
            g.len()
        ));
    }
    let s = m.scale();
    let mut dw1 = vec![0.0f32; a * c];
    let mut dw2 = vec![0.0f32; b * dk];
    for i in 0..a {
        for p in 0..b {
            let row = &g[(i * b + p) * cols..(i * b + p + 1) * cols];
            let w2_row = &w2[p * dk..(p + 1) * dk];
            for j in 0..c {
                let block = &row[j * dk..(j + 1) * dk];
                let f = w1[i * c + j] * s;
                let mut dot = 0.0f32;
                for ((gv, wv), d2) in block.iter().zip(w2_row).zip(&mut dw2[p * dk..]) {
                    dot += gv * wv;
                    *d2 += f * gv;
                }
                dw1[i * c + j] += s * dot;
            }
        }
    }
    let mut out = Vec::new();
    for (factor, d, full, an, bn) in [
        (&m.w1, dw1, "lokr_w1", "lokr_w1_a", "lokr_w1_b"),
        (&m.w2, dw2, "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    ] {
        match factor {
            KronFactor::Full(t) => out.push((full, like(t, d))),
            KronFactor::LowRank { a, b } => {
                let (da, db) = product_grads(a, b, &d);
                out.extend([(an, da), (bn, db)]);
            }
        }
    }
    Ok(out)
}

/// DoRA: `ΔW = V·c − W`, `V = W + s·up·down`, `c_j = m_j / ‖V_:,j‖` (the norm constant):
/// `dV = G·c`, `d(up·down) = s·dV`, `dm_j = Σ G·V / ‖V_:,j‖` over column `j`.
fn dora_grads(
    m: &DoraModule,
    weight: &HostTensor,
    g: &[f32],
) -> Result<Vec<(&'static str, HostTensor)>, String> {
    let (v, c) = m.direction(weight)?;
    let inp = weight.shape[1];
    let k: usize = weight.shape[2..].iter().product();
    let norms = column_norms(&v, &weight.shape);
    let s = m.lora.scale();
    let mut dm = vec![0.0f32; inp];
    let dv: Vec<f32> = (g.iter().zip(&v).enumerate())
        .map(|(idx, (gv, vv))| {
            let j = (idx / k) % inp;
            dm[j] += gv * vv / norms[j];
            s * gv * c[j]
        })
        .collect();
    let (dup, ddown) = product_grads(&m.lora.up, &flat(&m.lora.down), &dv);
    Ok(vec![
        ("lora_A.weight", like(&m.lora.down, ddown.data)),
        ("lora_B.weight", dup),
        ("lora_magnitude_vector", like(&m.magnitude, dm)),
    ])
}

/// `t` as `[rows, rest]`.
fn flat(t: &HostTensor) -> HostTensor {
    let rows = t.shape[0];
    HostTensor {
        shape: vec![rows, t.numel() / rows.max(1)],
        data: t.data.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::lora::LoraModule;

    fn t(shape: &[usize], seed: u32) -> HostTensor {
        let n: usize = shape.iter().product();
        HostTensor {
            shape: shape.to_vec(),
            data: (0..n)
                .map(|i| ((i as f32 + 1.0) * 0.37 + seed as f32 * 1.7).sin())
                .collect(),
        }
    }

    /// `Σ G ⊙ ΔW(params)`: its gradient in each parameter is what [`factor_grads`] gives.
    fn objective(m: &NetworkModule, w: &HostTensor, g: &HostTensor) -> f64 {
        let d = m.delta_for(w, 1.0).unwrap();
        d.data
            .iter()
            .zip(&g.data)
            .map(|(a, b)| f64::from(a * b))
            .sum()
    }

    /// Central differences of [`objective`] against the analytic gradients, every parameter.
    fn check(module: NetworkModule, w: &HostTensor) {
        let g = t(&w.shape, 9);
        let grads = factor_grads(&module, w, &g).unwrap();
        assert_eq!(grads.len(), module.params().len());
        for (name, grad) in grads {
            let mut m = module.clone();
            let n = m
                .params()
                .iter()
                .find(|(k, _)| *k == name)
                .unwrap()
                .1
                .numel();
            assert_eq!(grad.numel(), n, "{name}");
            for i in 0..n {
                let eps = 1e-2f32;
                let mut at = |delta: f32| {
                    for (k, p) in m.params_mut() {
                        if k == name {
                            p.data[i] += delta;
                        }
                    }
                    objective(&m, w, &g)
                };
                let up = at(eps);
                let down = at(-2.0 * eps);
                at(eps);
                let numeric = (up - down) / (2.0 * f64::from(eps));
                let analytic = f64::from(grad.data[i]);
                assert!(
                    (numeric - analytic).abs() <= 2e-3 * (1.0 + numeric.abs()),
                    "{name}[{i}]: numeric {numeric}, analytic {analytic}"
                );
            }
        }
    }

    #[test]
    fn hada_gradients_match_finite_differences() {
        let mut m = HadaModule::init(&[4, 3, 3, 3], 2, 3.0, 1).unwrap();
        m.w2_a = t(&[4, 2], 2);
        check(NetworkModule::Hada(m), &t(&[4, 3, 3, 3], 3));
    }

    #[test]
    fn kron_gradients_match_finite_differences() {
        let mut m = KronModule::init(&[6, 8], 1, 2.0, 2, 1).unwrap();
        if let KronFactor::LowRank { b, .. } = &mut m.w2 {
            *b = t(&b.shape.clone(), 4);
        }
        check(NetworkModule::Kron(m), &t(&[6, 8], 5));
        let full = KronModule {
            w1: KronFactor::Full(t(&[2, 2], 6)),
            w2: KronFactor::Full(t(&[2, 3, 3, 3], 7)),
            alpha: 1.0,
            shape: vec![4, 6, 3, 3],
        };
        check(NetworkModule::Kron(full), &t(&[4, 6, 3, 3], 8));
    }

    #[test]
    fn dora_gradients_match_finite_differences_with_the_norm_held() {
        // with the norm constant, the finite difference must hold it too: check the LoRA
        // and magnitude gradients of Σ G ⊙ (V·c) with c frozen at the start
        let w = t(&[5, 4], 10);
        let mut m = DoraModule::init(&w, 2, 2.0, 1).unwrap();
        m.lora.up = t(&[5, 2], 11);
        let g = t(&[5, 4], 12);
        let grads = factor_grads(&NetworkModule::Dora(m.clone()), &w, &g).unwrap();
        let (v0, _) = m.direction(&w).unwrap();
        let norms0 = column_norms(&v0, &w.shape);
        let frozen = |m: &DoraModule| -> f64 {
            let (v, _) = m.direction(&w).unwrap();
            (v.iter().zip(&g.data).enumerate())
                .map(|(i, (v, g))| f64::from(v * m.magnitude.data[i % 4] / norms0[i % 4] * g))
                .sum()
        };
        for (name, grad) in grads {
            for i in 0..grad.numel() {
                let eps = 1e-2f32;
                let mut plus = m.clone();
                let mut minus = m.clone();
                let bump = |d: &mut DoraModule, by: f32| {
                    let p = match name {
                        "lora_A.weight" => &mut d.lora.down,
                        "lora_B.weight" => &mut d.lora.up,
                        _ => &mut d.magnitude,
                    };
                    p.data[i] += by;
                };
                bump(&mut plus, eps);
                bump(&mut minus, -eps);
                let numeric = (frozen(&plus) - frozen(&minus)) / (2.0 * f64::from(eps));
                let analytic = f64::from(grad.data[i]);
                assert!(
                    (numeric - analytic).abs() <= 2e-3 * (1.0 + numeric.abs()),
                    "{name}[{i}]: numeric {numeric}, analytic {analytic}"
                );
            }
        }
        // a plain LoRA module has no factor gradients here
        let lora = LoraModule::init(&[5, 4], 2, 1.0, 1).unwrap();
        assert!(factor_grads(&NetworkModule::Lora(lora), &w, &g).is_err());
    }
}
