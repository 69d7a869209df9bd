//! Learning-rate schedules: diffusers' `get_scheduler` names (constant, constant_with_warmup,
//! cosine, linear) and A1111's `"5e-5:100, 5e-6:1500, 1e-7"` syntax.
//!
//! `step` is the number of optimiser steps already done: the rate for the first update is
//! `lr_at(0)` (torch's `LambdaLR` stepped after every `optimizer.step()`; A1111 applies its
//! schedule with the step counter before each update).

use std::f64::consts::PI;

/// A learning-rate schedule.
#[derive(Debug, Clone, PartialEq)]
pub enum LrSchedule {
    /// The base rate throughout.
    Constant,
    /// Linear ramp from 0 over `warmup_steps`, then the base rate.
    ConstantWithWarmup {
        /// Warm-up steps.
        warmup_steps: u64,
    },
    /// Warm-up, then cosine decay to 0 at `total_steps` over `num_cycles` (0.5: half a cosine).
    Cosine {
        /// Warm-up steps.
        warmup_steps: u64,
        /// Total optimiser steps.
        total_steps: u64,
        /// Cosine cycles (diffusers' default 0.5).
        num_cycles: f64,
    },
    /// Warm-up, then linear decay to 0 at `total_steps`.
    Linear {
        /// Warm-up steps.
        warmup_steps: u64,
        /// Total optimiser steps.
        total_steps: u64,
    },
    /// A1111's piecewise-constant schedule (ignores the base rate).
    A1111(A1111Schedule),
}

/// An unknown schedule name or an invalid A1111 schedule string.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LrError {
    /// Unknown schedule name.
    #[error(
        "unknown learning-rate schedule `{0}` (expected constant, constant_with_warmup, cosine, linear, or a rate schedule like \"5e-5:100, 5e-6:1500, 1e-7\")"
    )]
    UnknownName(String),
    /// An invalid A1111 schedule string.
    #[error("invalid learning-rate schedule \"{text}\": {message}")]
    Parse {
        /// The whole string.
        text: String,
        /// What is wrong, naming the piece.
        message: String,
    },
}

fn warmup_factor(step: u64, warmup: u64) -> Option<f64> {
    (step < warmup).then(|| step as f64 / warmup.max(1) as f64)
}

impl LrSchedule {
    /// A schedule by diffusers name (`constant`, `constant_with_warmup`, `cosine`, `linear`),
    /// or, for anything starting with a digit or `.`, an A1111 rate schedule.
    pub fn from_name(name: &str, warmup_steps: u64, total_steps: u64) -> Result<Self, LrError> {
        Ok(match name.trim() {
            "constant" => LrSchedule::Constant,
            "constant_with_warmup" => LrSchedule::ConstantWithWarmup { warmup_steps },
            "cosine" => LrSchedule::Cosine {
                warmup_steps,
                total_steps,
                num_cycles: 0.5,
            },
            "linear" => LrSchedule::Linear {
                warmup_steps,
                total_steps,
            },
            s if s.starts_with(|c: char| c.is_ascii_digit() || c == '.') => {
                LrSchedule::A1111(A1111Schedule::parse(s)?)
            }
            other => return Err(LrError::UnknownName(other.to_string())),
        })
    }

    /// The multiplier of the base rate at `step` (diffusers' lambdas); for A1111 schedules the
    /// rate itself.
    pub fn factor(&self, step: u64) -> f64 {
        match self {
            LrSchedule::Constant => 1.0,
            LrSchedule::ConstantWithWarmup { warmup_steps } => {
                warmup_factor(step, *warmup_steps).unwrap_or(1.0)
            }
            LrSchedule::Linear {
                warmup_steps,
                total_steps,
            } => warmup_factor(step, *warmup_steps).unwrap_or_else(|| {
                let left = total_steps.saturating_sub(step) as f64;
                let span = total_steps.saturating_sub(*warmup_steps).max(1) as f64;
                (left / span).max(0.0)
            }),
            LrSchedule::Cosine {
                warmup_steps,
                total_steps,
                num_cycles,
            } => warmup_factor(step, *warmup_steps).unwrap_or_else(|| {
                let progress = (step - warmup_steps) as f64
                    / total_steps.saturating_sub(*warmup_steps).max(1) as f64;
                (0.5 * (1.0 + (PI * num_cycles * 2.0 * progress).cos())).max(0.0)
            }),
            LrSchedule::A1111(s) => s.rate_at(step),
        }
    }

    /// The learning rate at `step` for base rate `base_lr`.
    pub fn lr_at(&self, base_lr: f64, step: u64) -> f64 {
        match self {
            LrSchedule::A1111(s) => s.rate_at(step),
            other => base_lr * other.factor(step),
        }
    }
}

/// A1111's rate schedule: `rate:until_step` pieces separated by commas, the rate applying
/// while `step < until_step`; a final piece without a step (or with step `-1`) runs to the
/// end. `"5e-5:100, 5e-6:1500, 1e-7"`: 5e-5 for steps 0–99, 5e-6 for 100–1499, then 1e-7.
#[derive(Debug, Clone, PartialEq)]
pub struct A1111Schedule {
    /// `(rate, until_step)`; `None` = to the end (only the last piece).
    pub pieces: Vec<(f64, Option<u64>)>,
}

impl A1111Schedule {
    /// Parses the A1111 syntax. Errors name the piece: a rate that is not a positive number,
    /// a step that is not a positive integer (or -1), steps that do not increase, a piece after
    /// an open-ended one, an empty string.
    pub fn parse(text: &str) -> Result<Self, LrError> {
        let err = |message: String| LrError::Parse {
            text: text.to_string(),
            message,
        };
        let mut pieces: Vec<(f64, Option<u64>)> = Vec::new();
        for raw in text.split(',') {
            let piece = raw.trim();
            if piece.is_empty() {
                return Err(err("empty piece (stray comma?)".into()));
            }
            if let Some((_, None)) = pieces.last() {
                return Err(err(format!(
                    "piece `{piece}` follows a rate without a step, which already runs to the end"
                )));
            }
            let (rate, until) = match piece.split_once(':') {
                Some((r, s)) => (r.trim(), Some(s.trim())),
                None => (piece, None),
            };
            let rate: f64 = rate
                .parse()
                .ok()
                .filter(|r: &f64| r.is_finite() && *r > 0.0)
                .ok_or_else(|| err(format!("`{rate}` in `{piece}` is not a positive number")))?;
            let until = match until {
                None | Some("-1") => None,
                Some(s) => {
                    let step: u64 = s.parse().ok().filter(|&v| v > 0).ok_or_else(|| {
                        err(format!(
                            "`{s}` in `{piece}` is not a positive whole step number (or -1)"
                        ))
                    })?;
                    if let Some((_, Some(prev))) = pieces.last()
                        && step <= *prev
                    {
                        return Err(err(format!(
                            "step {step} in `{piece}` does not come after step {prev}"
                        )));
                    }
                    Some(step)
                }
            };
            pieces.push((rate, until));
        }
        if pieces.is_empty() {
            return Err(err("no rates".into()));
        }
        Ok(Self { pieces })
    }

    /// The rate at `step` (the last rate past the final step).
    pub fn rate_at(&self, step: u64) -> f64 {
        self.pieces
            .iter()
            .find(|(_, until)| until.is_none_or(|u| step < u))
            .or(self.pieces.last())
            .map_or(0.0, |(r, _)| *r)
    }

    /// The step at which the schedule ends, when its last piece has one (A1111 stops training
    /// there).
    pub fn end_step(&self) -> Option<u64> {
        self.pieces.last().and_then(|(_, u)| *u)
    }
}
