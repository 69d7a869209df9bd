//! AdamW with 8-bit moments as `bitsandbytes.optim.AdamW8bit` computes it (its CPU kernels;
//! Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"). Each moment is
//! stored as one byte per value: a code into a 256-entry dynamic map (signed for `m`,
//! unsigned for `v`), scaled by its block's absolute maximum (blocks of 256 values). One
//! update of parameter `p` (step `t`, 1-based) with gradient `g`:
//! ```text
//! m = code1[qm]·absmax_m;  v = code2[qv]·absmax_v          // dequantise, block-wise
//! m = β1·m + (1 − β1)·g;   v = β2·v + (1 − β2)·g²
//! p = p · (1 − lr·wd)                                      // decoupled decay
//! p = p − lr/(1 − β1^t) · m / (sqrt(v)/sqrt(1 − β2^t) + eps)
//! absmax = max|·| per block;  q = nearest code of value/absmax   // requantise
//! ```
//! Tensors with fewer than `min_8bit_size` values (4096, bitsandbytes' default: most LoRA
//! matrices) keep f32 moments and take bitsandbytes' 32-bit step,
//! `p = p·(1 − lr·wd) − lr·sqrt(1 − β2^t)/(1 − β1^t) · m / (sqrt(v) + eps·sqrt(1 − β2^t))`.
//! Defaults: β = (0.9, 0.999), eps 1e-8. State of an 8-bit tensor: two bytes per value and two
//! f32 per block of 256.
//!
//! The dynamic map (Dettmers 2015): for exponent `i` in 0..7, the midpoints of an even split of
//! [0.1, 1] into `2^i` (signed, both signs) or `2^(i+1)` (unsigned) parts, times `10^(i−6)`;
//! with 0 and 1, sorted.

use std::collections::BTreeMap;

use super::host::{HostOptimizer, StateFile, StateIo, StateWriter, state_shape};
use super::{OptimError, OptimizerKind};

/// Values per quantisation block.
pub const BLOCK: usize = 256;

/// AdamW8bit's hyper-parameters (bitsandbytes' defaults; weight decay the stage's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW8bitConfig {
    /// β1 (default 0.9).
    pub beta1: f64,
    /// β2 (default 0.999).
    pub beta2: f64,
    /// ε (default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay (the train stage's `weight_decay`, default 1e-2).
    pub weight_decay: f64,
    /// Tensors with fewer values keep f32 moments (default 4096).
    pub min_8bit_size: usize,
}

impl Default for AdamW8bitConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            min_8bit_size: 4096,
        }
    }
}

/// One moment in 8 bits: a code per value and an absolute maximum per block.
#[derive(Debug, Clone)]
struct Quantized {
    /// `[numel]`.
    codes: Vec<u8>,
    /// `[ceil(numel / 256)]`.
    absmax: Vec<f32>,
}

impl Quantized {
    fn zeros(n: usize) -> Self {
        Self {
            codes: vec![0; n],
            absmax: vec![0.0; n.div_ceil(BLOCK)],
        }
    }

    fn dequantize(&self, map: &[f32; 256]) -> Vec<f32> {
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &c)| map[c as usize] * self.absmax[i / BLOCK])
            .collect()
    }

    fn quantize(values: &[f32], map: &[f32; 256]) -> Self {
        // a value maps to the code whose midpoints enclose it (the lower on a tie)
        let bounds: Vec<f32> = map.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        let mut codes = Vec::with_capacity(values.len());
        let mut absmax = Vec::with_capacity(values.len().div_ceil(BLOCK));
        for block in values.chunks(BLOCK) {
            let max = block.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let scale = 1.0 / max.max(1e-38);
            absmax.push(max);
            for v in block {
                let x = (v * scale).clamp(-1.0, 1.0);
                codes.push(bounds.partition_point(|&b| b < x) as u8);
            }
        }
        Self { codes, absmax }
    }
}

/// One parameter's moments.
#[derive(Debug, Clone)]
enum Moments {
    /// f32 (tensors under `min_8bit_size`).
    Full { m: Vec<f32>, v: Vec<f32> },
    /// 8-bit.
    Quantized { m: Quantized, v: Quantized },
}

impl Moments {
    fn numel(&self) -> usize {
        match self {
            Self::Full { m, .. } => m.len(),
            Self::Quantized { m, .. } => m.codes.len(),
        }
    }
}

/// The AdamW8bit optimiser.
#[derive(Debug, Clone)]
pub struct AdamW8bit {
    /// Hyper-parameters.
    pub config: AdamW8bitConfig,
    /// The dynamic maps (boxed: 1 KiB each).
    signed: Box<[f32; 256]>,
    unsigned: Box<[f32; 256]>,
    states: BTreeMap<String, (u64, Moments)>,
}

/// torch's `linspace(start, end, steps)` in f32.
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// bitsandbytes' dynamic quantisation map (`create_dynamic_map(signed)`, 8 bits, 7 exponent
/// bits): 256 sorted values in [−1, 1] (signed) or [0, 1].
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let items = if signed {
            (1 << i) + 1
        } else {
            (1 << (i + 1)) + 1
        };
        let bounds = linspace(0.1, 1.0, items);
        let scale = 10f64.powi(i - 6) as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-scale * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0.0f32; 256];
    out.copy_from_slice(&data);
    out
}

impl AdamW8bit {
    /// A fresh optimiser.
    pub fn new(config: AdamW8bitConfig) -> Self {
        Self {
            config,
            signed: Box::new(dynamic_map(true)),
            unsigned: Box::new(dynamic_map(false)),
            states: BTreeMap::new(),
        }
    }
}

impl HostOptimizer for AdamW8bit {
    fn update(
        &mut self,
        name: &str,
        p: &mut [f32],
        g: &[f32],
        _dims: &[usize],
        lr: f64,
    ) -> Result<(), OptimError> {
        let c = self.config;
        let n = p.len();
        let (step, moments) = self.states.entry(name.to_string()).or_insert_with(|| {
            let moments = if n < c.min_8bit_size {
                Moments::Full {
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                }
            } else {
                Moments::Quantized {
                    m: Quantized::zeros(n),
                    v: Quantized::zeros(n),
                }
            };
            (0, moments)
        });
        if moments.numel() != n {
            return Err(state_shape(name, n, moments.numel()));
        }
        *step += 1;
        let t = *step as i32;
        let (b1, one_b1) = (c.beta1 as f32, (1.0 - c.beta1) as f32);
        let (b2, one_b2) = (c.beta2 as f32, (1.0 - c.beta2) as f32);
        let correction1 = 1.0 - c.beta1.powi(t);
        let correction2 = (1.0 - c.beta2.powi(t)).sqrt();
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let decays = c.weight_decay > 0.0;
        match moments {
            Moments::Full { m, v } => {
                let step_size = (-lr * correction2 / correction1) as f32;
                let eps = (c.eps * correction2) as f32;
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = *m * b1 + one_b1 * g;
                    *v = *v * b2 + one_b2 * g * g;
                    if decays {
                        *p *= decay;
                    }
                    *p += step_size * (*m / (v.sqrt() + eps));
                }
            }
            Moments::Quantized { m: qm, v: qv } => {
                let mut m = qm.dequantize(&self.signed);
                let mut v = qv.dequantize(&self.unsigned);
                let c2 = correction2 as f32;
                let eps = c.eps as f32;
                let step_size = (-lr / correction1) as f32;
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = *m * b1 + one_b1 * g;
                    *v = *v * b2 + one_b2 * g * g;
                    let denom = v.sqrt() / c2 + eps;
                    if decays {
                        *p *= decay;
                    }
                    *p += step_size * *m / denom;
                }
                *qm = Quantized::quantize(&m, &self.signed);
                *qv = Quantized::quantize(&v, &self.unsigned);
            }
        }
        Ok(())
    }
}

impl StateIo for AdamW8bit {
    const KIND: OptimizerKind = OptimizerKind::AdamW8bit;

    fn write(&self, out: &mut StateWriter) {
        let c = self.config;
        for (k, v) in [
            ("beta1", c.beta1),
            ("beta2", c.beta2),
            ("eps", c.eps),
            ("weight_decay", c.weight_decay),
        ] {
            out.config.insert(k.into(), v.into());
        }
        out.config
            .insert("min_8bit_size".into(), c.min_8bit_size.into());
        for (name, (step, moments)) in &self.states {
            match moments {
                Moments::Full { m, v } => {
                    out.params.insert(
                        name.clone(),
                        serde_json::json!({ "step": step, "bits": 32 }),
                    );
                    out.tensor(name, "state1", m.clone());
                    out.tensor(name, "state2", v.clone());
                }
                Moments::Quantized { m, v } => {
                    out.params
                        .insert(name.clone(), serde_json::json!({ "step": step, "bits": 8 }));
                    let codes = |q: &Quantized| q.codes.iter().map(|&c| f32::from(c)).collect();
                    out.tensor(name, "state1", codes(m));
                    out.tensor(name, "state2", codes(v));
                    out.tensor(name, "absmax1", m.absmax.clone());
                    out.tensor(name, "absmax2", v.absmax.clone());
                }
            }
        }
    }

    fn read(file: &StateFile) -> Result<Self, OptimError> {
        let config = AdamW8bitConfig {
            beta1: file.config("beta1")?,
            beta2: file.config("beta2")?,
            eps: file.config("eps")?,
            weight_decay: file.config("weight_decay")?,
            min_8bit_size: file.config("min_8bit_size")? as usize,
        };
        let mut optimizer = Self::new(config);
        for (name, scalars) in file.params()? {
            let step = file.param_count(&name, &scalars, "step")?;
            let state1 = file.tensor(&name, "state1")?;
            let n = state1.len();
            let state2 = file.tensor_of(&name, "state2", n)?;
            let moments = match file.param_count(&name, &scalars, "bits")? {
                32 => Moments::Full {
                    m: state1,
                    v: state2,
                },
                8 => {
                    let codes = |t: Vec<f32>, slot: &str| -> Result<Vec<u8>, OptimError> {
                        t.into_iter()
                            .map(|c| {
                                if (0.0..=255.0).contains(&c) && c.fract() == 0.0 {
                                    Ok(c as u8)
                                } else {
                                    Err(file.bad(format!("`{name}.{slot}` holds {c}, not a code")))
                                }
                            })
                            .collect()
                    };
                    let blocks = n.div_ceil(BLOCK);
                    Moments::Quantized {
                        m: Quantized {
                            codes: codes(state1, "state1")?,
                            absmax: file.tensor_of(&name, "absmax1", blocks)?,
                        },
                        v: Quantized {
                            codes: codes(state2, "state2")?,
                            absmax: file.tensor_of(&name, "absmax2", blocks)?,
                        },
                    }
                }
                b => return Err(file.bad(format!("state of `{name}` has {b} bits"))),
            };
            optimizer.states.insert(name, (step, moments));
        }
        Ok(optimizer)
    }
}
