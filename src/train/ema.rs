//! An exponential moving average of the trained weights, as diffusers' `EMAModel` keeps it
//! (`--use_ema` in its training examples): after optimiser step `t` (1-based) every shadow
//! value moves toward the weight by `1 − decay(t)`,
//! ```text
//! s = s − (1 − decay(t))·(s − w)
//! decay(t) = 0                                   for t = 1 (the shadow starts as the weights)
//!          = min(ema_decay, (1 + k) / (10 + k))  k = t − 1, diffusers' default
//!          = min(ema_decay, 1 − (1 + k)^(−2/3))  with `ema_warmup` (use_ema_warmup, inv_gamma 1,
//!                                                 power 2/3)
//! ```
//! The shadow lives on the host in f32 and is saved beside each checkpoint, so a resumed run
//! ends bit-identical to an uninterrupted one.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::formats::{FormatError, HostTensor, read_safetensors, write_safetensors};

/// EMA settings (the train stage's `ema_decay`, `ema_warmup`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmaConfig {
    /// The largest decay (diffusers' `decay`; 0.9999 there, 0.999 suits short fine-tunes).
    pub decay: f64,
    /// diffusers' `use_ema_warmup`: `1 − (1 + k)^(−2/3)` instead of `(1 + k) / (10 + k)`.
    pub warmup: bool,
}

impl EmaConfig {
    /// The decay applied at optimiser step `t` (1-based), as diffusers' `get_decay` with
    /// `update_after_step` 0 and `min_decay` 0.
    pub fn decay_at(&self, t: u64) -> f64 {
        let k = t.saturating_sub(1) as f64;
        if k <= 0.0 {
            return 0.0;
        }
        let d = if self.warmup {
            1.0 - (1.0 + k).powf(-2.0 / 3.0)
        } else {
            (1.0 + k) / (10.0 + k)
        };
        d.min(self.decay).max(0.0)
    }
}

/// The averaged weights, by the trained tensors' names.
#[derive(Debug, Clone)]
pub struct Ema {
    config: EmaConfig,
    /// Updates done (diffusers' `optimization_step`).
    updates: u64,
    shadow: BTreeMap<String, HostTensor>,
}

/// Metadata key of the update count in a saved EMA.
const UPDATES_KEY: &str = "ema.updates";

impl Ema {
    /// A fresh average (the first update copies the weights).
    pub fn new(config: EmaConfig) -> Self {
        Self {
            config,
            updates: 0,
            shadow: BTreeMap::new(),
        }
    }

    /// One update with the weights after the next optimiser step.
    pub fn update(&mut self, weights: &BTreeMap<String, HostTensor>) {
        self.updates += 1;
        let one_minus = (1.0 - self.config.decay_at(self.updates)) as f32;
        for (name, w) in weights {
            match self.shadow.get_mut(name) {
                Some(s) if s.data.len() == w.data.len() => {
                    for (s, &w) in s.data.iter_mut().zip(&w.data) {
                        *s -= one_minus * (*s - w);
                    }
                }
                _ => {
                    self.shadow.insert(name.clone(), w.clone());
                }
            }
        }
    }

    /// The averaged weights.
    pub fn weights(&self) -> &BTreeMap<String, HostTensor> {
        &self.shadow
    }

    /// Updates done.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Writes the average to a safetensors file (atomically).
    pub fn save(&self, path: &Path) -> Result<(), FormatError> {
        let meta = HashMap::from([(UPDATES_KEY.to_string(), self.updates.to_string())]);
        write_safetensors(path, &self.shadow, Some(meta))
    }

    /// Reads an average [`Self::save`] wrote.
    pub fn load(path: &Path, config: EmaConfig) -> Result<Self, FormatError> {
        let st = read_safetensors(path)?;
        let updates = st
            .metadata
            .get(UPDATES_KEY)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                FormatError::invalid(path, format!("metadata `{UPDATES_KEY}` is missing"))
            })?;
        Ok(Self {
            config,
            updates,
            shadow: st.tensors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_follows_diffusers_get_decay() {
        let plain = EmaConfig {
            decay: 0.9999,
            warmup: false,
        };
        assert_eq!(plain.decay_at(1), 0.0);
        assert_eq!(plain.decay_at(2), 2.0 / 11.0);
        assert_eq!(plain.decay_at(101), 101.0 / 110.0);
        let capped = EmaConfig {
            decay: 0.5,
            warmup: false,
        };
        assert_eq!(capped.decay_at(1000), 0.5);
        let warm = EmaConfig {
            decay: 0.9999,
            warmup: true,
        };
        // 1 − (1 + 1)^(−2/3) = 1 − 0.6299605249…
        assert!((warm.decay_at(2) - 0.370_039_475_052_563_2).abs() < 1e-15);
    }

    #[test]
    fn the_average_starts_at_the_weights_and_moves_by_one_minus_decay() {
        let config = EmaConfig {
            decay: 0.9,
            warmup: false,
        };
        let w = |v: f32| {
            let t = HostTensor::new(vec![2], vec![v, -v]).unwrap();
            BTreeMap::from([("p".to_string(), t)])
        };
        let mut ema = Ema::new(config);
        ema.update(&w(1.0));
        assert_eq!(ema.weights()["p"].data, vec![1.0, -1.0]);
        ema.update(&w(3.0));
        // decay(2) = 2/11: s = 1 − (9/11)·(1 − 3)
        let d = (1.0 - 2.0f64 / 11.0) as f32;
        assert_eq!(ema.weights()["p"].data[0], 1.0 - d * (1.0 - 3.0));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ema.safetensors");
        ema.save(&path).unwrap();
        let back = Ema::load(&path, config).unwrap();
        assert_eq!(back.updates(), 2);
        assert_eq!(back.weights()["p"].data, ema.weights()["p"].data);
    }
}
