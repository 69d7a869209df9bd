//! What the host optimisers (all but AdamW) share: the update interface on flat f32 values,
//! the f32 element operations torch's kernels perform, and their state files.
//!
//! A state file holds, besides [`super::KIND_KEY`]:
//! - metadata `optimizer.config`: JSON hyper-parameters;
//! - metadata `optimizer.state`: JSON scalars (f64 state as its bits, exact through JSON), step-wide ones and, under `params`, each
//!   parameter's (its step count, …);
//! - tensors `<parameter>.<slot>`, flat `[numel]` (8-bit codes are stored by value as f32).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::{KIND_KEY, Metadata, OptimError, OptimizerKind};
use crate::formats::{FormatError, HostTensor};

/// An optimiser computing on the host: `p` and `g` are a parameter's values and gradient,
/// flat, `dims` its shape.
pub(super) trait HostOptimizer {
    /// The first pass of a step (only Prodigy's does anything).
    fn observe(
        &mut self,
        _name: &str,
        _p: &[f32],
        _g: &[f32],
        _dims: &[usize],
        _lr: f64,
    ) -> Result<(), OptimError> {
        Ok(())
    }

    /// The update of one parameter.
    fn update(
        &mut self,
        name: &str,
        p: &mut [f32],
        g: &[f32],
        dims: &[usize],
        lr: f64,
    ) -> Result<(), OptimError>;
}

/// An optimiser's state as a file and back.
pub(super) trait StateIo: Sized {
    /// The optimiser the file is of.
    const KIND: OptimizerKind;
    /// Hyper-parameters, step-wide scalars, and per-parameter scalars and tensors.
    fn write(&self, out: &mut StateWriter);
    /// The inverse of [`write`](Self::write).
    fn read(file: &StateFile) -> Result<Self, OptimError>;
}

/// One parameter's scalars in a state file.
pub(super) type Scalars = Map<String, Value>;

/// What [`StateIo::write`] fills.
#[derive(Default)]
pub(super) struct StateWriter {
    pub config: Map<String, Value>,
    pub scalars: Map<String, Value>,
    pub params: Map<String, Value>,
    pub tensors: BTreeMap<String, HostTensor>,
}

impl StateWriter {
    /// A flat tensor `<name>.<slot>`.
    pub fn tensor(&mut self, name: &str, slot: &str, data: Vec<f32>) {
        self.tensors.insert(
            format!("{name}.{slot}"),
            HostTensor {
                shape: vec![data.len()],
                data,
            },
        );
    }
}

/// The tensors and metadata of an optimiser's state file.
pub(super) fn to_file<O: StateIo>(o: &O) -> (BTreeMap<String, HostTensor>, Metadata) {
    let mut w = StateWriter::default();
    o.write(&mut w);
    let mut state = w.scalars;
    state.insert("params".into(), Value::Object(w.params));
    let meta = HashMap::from([
        (KIND_KEY.to_string(), O::KIND.name().to_string()),
        (
            "optimizer.config".to_string(),
            Value::Object(w.config).to_string(),
        ),
        (
            "optimizer.state".to_string(),
            Value::Object(state).to_string(),
        ),
    ]);
    (w.tensors, meta)
}

/// Reads an optimiser's state from a parsed file.
pub(super) fn from_file<O: StateIo>(file: &StateFile) -> Result<O, OptimError> {
    O::read(file)
}

/// A parsed state file, with accessors whose errors name the file and the missing item.
pub(super) struct StateFile {
    path: PathBuf,
    tensors: BTreeMap<String, HostTensor>,
    config: Result<Value, String>,
    state: Result<Value, String>,
}

impl StateFile {
    /// The file at `path` with its tensors and metadata.
    pub fn new(path: &Path, tensors: BTreeMap<String, HostTensor>, meta: Metadata) -> Self {
        let parse = |k: &str| -> Result<Value, String> {
            let text = meta
                .get(k)
                .ok_or_else(|| format!("metadata `{k}` is missing"))?;
            serde_json::from_str(text).map_err(|e| format!("metadata `{k}`: {e}"))
        };
        Self {
            path: path.to_path_buf(),
            tensors,
            config: parse("optimizer.config"),
            state: parse("optimizer.state"),
        }
    }

    /// An error about this file.
    pub fn bad(&self, message: impl Into<String>) -> OptimError {
        OptimError::File(FormatError::invalid(&self.path, message.into()))
    }

    fn object<'a>(
        &self,
        v: &'a Result<Value, String>,
        what: &str,
    ) -> Result<&'a Value, OptimError> {
        let v = v.as_ref().map_err(|e| self.bad(e.clone()))?;
        if v.is_object() {
            Ok(v)
        } else {
            Err(self.bad(format!("metadata `{what}` is not an object")))
        }
    }

    /// A number of `optimizer.config`.
    pub fn config(&self, key: &str) -> Result<f64, OptimError> {
        self.object(&self.config, "optimizer.config")?
            .get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| self.bad(format!("metadata `optimizer.config` lacks `{key}`")))
    }

    /// An f64 of `optimizer.config` stored as its bits.
    pub fn config_bits(&self, key: &str) -> Result<f64, OptimError> {
        self.object(&self.config, "optimizer.config")?
            .get(key)
            .and_then(Value::as_u64)
            .map(f64::from_bits)
            .ok_or_else(|| self.bad(format!("metadata `optimizer.config` lacks `{key}`")))
    }

    /// A flag of `optimizer.config`.
    pub fn config_flag(&self, key: &str) -> Result<bool, OptimError> {
        self.object(&self.config, "optimizer.config")?
            .get(key)
            .and_then(Value::as_bool)
            .ok_or_else(|| self.bad(format!("metadata `optimizer.config` lacks `{key}`")))
    }

    /// A step-wide number of `optimizer.state`.
    pub fn scalar(&self, key: &str) -> Result<f64, OptimError> {
        self.object(&self.state, "optimizer.state")?
            .get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| self.bad(format!("metadata `optimizer.state` lacks `{key}`")))
    }

    /// A step-wide f64 of `optimizer.state`, stored as its bits (exact through JSON).
    pub fn scalar_bits(&self, key: &str) -> Result<f64, OptimError> {
        self.object(&self.state, "optimizer.state")?
            .get(key)
            .and_then(Value::as_u64)
            .map(f64::from_bits)
            .ok_or_else(|| self.bad(format!("metadata `optimizer.state` lacks `{key}`")))
    }

    /// The per-parameter scalars: `(name, object)` for every parameter with state.
    pub fn params(&self) -> Result<Vec<(String, Scalars)>, OptimError> {
        let params = self
            .object(&self.state, "optimizer.state")?
            .get("params")
            .and_then(Value::as_object)
            .ok_or_else(|| self.bad("metadata `optimizer.state` lacks `params`"))?;
        params
            .iter()
            .map(|(name, v)| match v.as_object() {
                Some(o) => Ok((name.clone(), o.clone())),
                None => Err(self.bad(format!("state of `{name}` is not an object"))),
            })
            .collect()
    }

    /// An f64 among a parameter's scalars, stored as its bits (exact through JSON).
    pub fn param_bits(
        &self,
        name: &str,
        scalars: &Map<String, Value>,
        key: &str,
    ) -> Result<f64, OptimError> {
        Ok(f64::from_bits(self.param_count(name, scalars, key)?))
    }

    /// A count among a parameter's scalars.
    pub fn param_count(
        &self,
        name: &str,
        scalars: &Map<String, Value>,
        key: &str,
    ) -> Result<u64, OptimError> {
        scalars
            .get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| self.bad(format!("state of `{name}`: `{key}` is not a count")))
    }

    /// The flat tensor `<name>.<slot>`.
    pub fn tensor(&self, name: &str, slot: &str) -> Result<Vec<f32>, OptimError> {
        let key = format!("{name}.{slot}");
        let t = self
            .tensors
            .get(&key)
            .ok_or_else(|| self.bad(format!("tensor `{key}` is missing")))?;
        if t.shape.len() != 1 {
            return Err(self.bad(format!("tensor `{key}` is not 1-d")));
        }
        Ok(t.data.clone())
    }

    /// The flat tensor `<name>.<slot>` with `n` values.
    pub fn tensor_of(&self, name: &str, slot: &str, n: usize) -> Result<Vec<f32>, OptimError> {
        let t = self.tensor(name, slot)?;
        if t.len() != n {
            return Err(self.bad(format!(
                "tensor `{name}.{slot}` has {} values, expected {n}",
                t.len()
            )));
        }
        Ok(t)
    }
}

/// The error of state that does not fit its parameter.
pub(super) fn state_shape(name: &str, param: usize, state: usize) -> OptimError {
    OptimError::StateShape {
        name: name.to_string(),
        param,
        state,
    }
}

/// torch's `lerp` on f32 (`weight < 0.5 ? a + w·(b − a) : b − (b − a)·(1 − w)`).
pub(super) fn lerp(a: f32, b: f32, w: f32) -> f32 {
    let diff = b - a;
    if w.abs() < 0.5 {
        a + w * diff
    } else {
        b - diff * (1.0 - w)
    }
}

/// The sum of f32 values, accumulated in f64 and rounded (torch's reductions are at least
/// that precise on small tensors).
pub(super) fn sum(values: impl Iterator<Item = f32>) -> f32 {
    values.map(f64::from).sum::<f64>() as f32
}
