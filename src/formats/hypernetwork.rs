//! A1111 hypernetworks: the `.pt` file A1111's loader reads (a torch archive holding a dict
//! with integer context-width keys → `(k state dict, v state dict)` plus A1111's metadata keys)
//! and a safetensors twin.
//!
//! Each module is an MLP `x + mlp(x) · multiplier` whose `torch.nn.Sequential` interleaves
//! linears with activation, layer-norm and dropout layers; parameters are named by their
//! Sequential index (`linear.0.weight`, `linear.0.bias`, `linear.2.weight`, …), so the indices
//! depend on the configuration. [`sequential_layout`] reproduces A1111's construction
//! (`modules/hypernetworks/hypernetwork.py`, `HypernetworkModule.__init__`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::torch_pickle::{PyValue, read_torch, write_torch};
use super::{FormatError, HostTensor, Result, read_safetensors, write_safetensors};

/// A1111's hypernetwork settings (the metadata keys of its `.pt` file).
#[derive(Debug, Clone, PartialEq)]
pub struct HypernetworkConfig {
    /// `layer_structure`: width multipliers, starting and ending with 1 (default `[1, 2, 1]`).
    pub layer_structure: Vec<f64>,
    /// `activation_func`: `linear` (or `None`), `relu`, `leakyrelu`, `elu`, `swish`
    /// (A1111 maps it to `Hardswish`), `tanh`, `sigmoid`, or another torch activation name.
    pub activation_func: Option<String>,
    /// `is_layer_norm`: a LayerNorm after every linear (and its activation).
    pub is_layer_norm: bool,
    /// `weight_initialization`: `Normal` (std 0.01), `XavierUniform`, `XavierNormal`,
    /// `KaimingUniform`, `KaimingNormal`.
    pub weight_initialization: String,
    /// `activate_output`: apply the activation after the last linear too.
    pub activate_output: bool,
    /// `use_dropout`.
    pub use_dropout: bool,
    /// `dropout_structure`: dropout probability after each layer (same length as
    /// `layer_structure`); `None` derives it from `use_dropout` / `last_layer_dropout` as A1111 does.
    pub dropout_structure: Option<Vec<f64>>,
    /// `last_layer_dropout`.
    pub last_layer_dropout: bool,
}

impl Default for HypernetworkConfig {
    /// A1111's defaults when creating a hypernetwork: `1, 2, 1`, linear activation, Normal init,
    /// no layer norm, no dropout.
    fn default() -> Self {
        Self {
            layer_structure: vec![1.0, 2.0, 1.0],
            activation_func: Some("linear".into()),
            is_layer_norm: false,
            weight_initialization: "Normal".into(),
            activate_output: false,
            use_dropout: false,
            dropout_structure: None,
            last_layer_dropout: false,
        }
    }
}

/// A1111's `parse_dropout_structure`: no dropout → zeros; otherwise `[0, 0.3 × (len − 3),
/// (0.3 if last_layer_dropout else 0), 0]` (for a 2-entry structure that list has 3 entries,
/// exactly as in A1111).
pub fn parse_dropout_structure(
    layer_structure: &[f64],
    use_dropout: bool,
    last_layer_dropout: bool,
) -> Vec<f64> {
    if !use_dropout {
        return vec![0.0; layer_structure.len()];
    }
    let mut d = vec![0.0];
    d.extend(std::iter::repeat_n(
        0.3,
        layer_structure.len().saturating_sub(3),
    ));
    d.push(if last_layer_dropout { 0.3 } else { 0.0 });
    d.push(0.0);
    d
}

impl HypernetworkConfig {
    /// The dropout structure in force (given, or derived).
    pub fn effective_dropout_structure(&self) -> Vec<f64> {
        self.dropout_structure.clone().unwrap_or_else(|| {
            parse_dropout_structure(
                &self.layer_structure,
                self.use_dropout,
                self.last_layer_dropout,
            )
        })
    }

    fn has_activation(&self) -> bool {
        !matches!(self.activation_func.as_deref(), None | Some("linear"))
    }
}

/// One entry of the Sequential A1111 builds.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqLayer {
    /// `Linear(in_features, out_features)`.
    Linear {
        /// Input width.
        in_features: usize,
        /// Output width.
        out_features: usize,
    },
    /// The activation (no parameters).
    Activation,
    /// `LayerNorm(width)`.
    LayerNorm {
        /// Normalised width.
        width: usize,
    },
    /// `Dropout(p)` (no parameters).
    Dropout {
        /// Drop probability.
        p: f64,
    },
}

/// The Sequential A1111 builds for a module of width `dim`, in order (the index of each entry
/// is its Sequential index). Errors as A1111's asserts do.
pub fn sequential_layout(dim: usize, config: &HypernetworkConfig) -> Result<Vec<SeqLayer>, String> {
    let ls = &config.layer_structure;
    if ls.len() < 2 || ls[0] != 1.0 || ls[ls.len() - 1] != 1.0 {
        return Err(format!(
            "layer_structure {ls:?} must start and end with 1 and have at least two entries"
        ));
    }
    let dropout = config.effective_dropout_structure();
    let width = |m: f64| (dim as f64 * m) as usize; // Python int(dim * m)
    let mut out = Vec::new();
    for i in 0..ls.len() - 1 {
        out.push(SeqLayer::Linear {
            in_features: width(ls[i]),
            out_features: width(ls[i + 1]),
        });
        // A1111 skips the activation after the last linear unless activate_output.
        let is_last = i + 2 >= ls.len();
        if config.has_activation() && (config.activate_output || !is_last) {
            out.push(SeqLayer::Activation);
        }
        if config.is_layer_norm {
            out.push(SeqLayer::LayerNorm {
                width: width(ls[i + 1]),
            });
        }
        let p = dropout.get(i + 1).copied().unwrap_or(0.0);
        if p > 0.0 {
            if p >= 1.0 {
                return Err(format!("dropout probability {p} must be below 1"));
            }
            out.push(SeqLayer::Dropout { p });
        }
    }
    Ok(out)
}

/// One linear layer of a hypernetwork MLP, with the LayerNorm that follows it when enabled.
#[derive(Debug, Clone, PartialEq)]
pub struct HyperLinear {
    /// `[out, in]`.
    pub weight: HostTensor,
    /// `[out]`.
    pub bias: HostTensor,
    /// LayerNorm `(weight [out], bias [out])` when `is_layer_norm`.
    pub layer_norm: Option<(HostTensor, HostTensor)>,
}

/// One MLP (the k or the v module of a width).
#[derive(Debug, Clone, PartialEq)]
pub struct HypernetworkModule {
    /// The linears, in order (`layer_structure.len() - 1` of them).
    pub layers: Vec<HyperLinear>,
}

impl HypernetworkModule {
    /// The state dict in A1111's Sequential naming and order.
    pub fn state_dict(
        &self,
        dim: usize,
        config: &HypernetworkConfig,
    ) -> Result<Vec<(String, HostTensor)>, String> {
        let layout = sequential_layout(dim, config)?;
        let mut layers = self.layers.iter();
        let mut current: Option<&HyperLinear> = None;
        let mut out = Vec::new();
        for (idx, l) in layout.iter().enumerate() {
            match l {
                SeqLayer::Linear {
                    in_features,
                    out_features,
                } => {
                    let lin = layers
                        .next()
                        .ok_or("fewer linears than layer_structure needs")?;
                    if lin.weight.shape != [*out_features, *in_features]
                        || lin.bias.shape != [*out_features]
                    {
                        return Err(format!(
                            "linear.{idx}: weight {:?} / bias {:?}, expected [{out_features}, {in_features}] / [{out_features}]",
                            lin.weight.shape, lin.bias.shape
                        ));
                    }
                    out.push((format!("linear.{idx}.weight"), lin.weight.clone()));
                    out.push((format!("linear.{idx}.bias"), lin.bias.clone()));
                    current = Some(lin);
                }
                SeqLayer::LayerNorm { width } => {
                    let (w, b) = current
                        .and_then(|c| c.layer_norm.as_ref())
                        .ok_or_else(|| format!("linear.{idx}: layer norm missing"))?;
                    if w.shape != [*width] || b.shape != [*width] {
                        return Err(format!(
                            "linear.{idx}: layer norm of width {:?}, expected {width}",
                            w.shape
                        ));
                    }
                    out.push((format!("linear.{idx}.weight"), w.clone()));
                    out.push((format!("linear.{idx}.bias"), b.clone()));
                }
                SeqLayer::Activation | SeqLayer::Dropout { .. } => {}
            }
        }
        if layers.next().is_some() {
            return Err("more linears than layer_structure allows".into());
        }
        Ok(out)
    }

    /// Rebuilds a module from a state dict in A1111's naming (also the oldest
    /// `linear1`/`linear2` names, which A1111 renames to `linear.0`/`linear.1`). Every expected
    /// key must be present with its shape and no other key may be; errors name the key.
    pub fn from_state_dict(
        dim: usize,
        config: &HypernetworkConfig,
        mut sd: HashMap<String, HostTensor>,
    ) -> Result<Self, String> {
        for (old, new) in [
            ("linear1.weight", "linear.0.weight"),
            ("linear1.bias", "linear.0.bias"),
            ("linear2.weight", "linear.1.weight"),
            ("linear2.bias", "linear.1.bias"),
        ] {
            if let Some(t) = sd.remove(old) {
                sd.insert(new.to_string(), t);
            }
        }
        let layout = sequential_layout(dim, config)?;
        let mut take = |key: String, shape: Vec<usize>| -> Result<HostTensor, String> {
            let t = sd
                .remove(&key)
                .ok_or_else(|| format!("`{key}` is missing"))?;
            if t.shape != shape {
                return Err(format!(
                    "`{key}` has shape {:?}, expected {shape:?}",
                    t.shape
                ));
            }
            Ok(t)
        };
        let mut layers: Vec<HyperLinear> = Vec::new();
        for (idx, l) in layout.iter().enumerate() {
            match l {
                SeqLayer::Linear {
                    in_features,
                    out_features,
                } => layers.push(HyperLinear {
                    weight: take(
                        format!("linear.{idx}.weight"),
                        vec![*out_features, *in_features],
                    )?,
                    bias: take(format!("linear.{idx}.bias"), vec![*out_features])?,
                    layer_norm: None,
                }),
                SeqLayer::LayerNorm { width } => {
                    let w = take(format!("linear.{idx}.weight"), vec![*width])?;
                    let b = take(format!("linear.{idx}.bias"), vec![*width])?;
                    if let Some(last) = layers.last_mut() {
                        last.layer_norm = Some((w, b));
                    }
                }
                SeqLayer::Activation | SeqLayer::Dropout { .. } => {}
            }
        }
        if let Some(extra) = sd.keys().min() {
            return Err(format!(
                "unexpected tensor `{extra}` for this layer structure"
            ));
        }
        Ok(Self { layers })
    }
}

/// An A1111 hypernetwork: settings, A1111's bookkeeping, and the k/v modules per context width.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypernetwork {
    /// `name`.
    pub name: String,
    /// `step`: training steps done.
    pub step: u64,
    /// `sd_checkpoint`: short hash of the model it was trained on.
    pub sd_checkpoint: Option<String>,
    /// `sd_checkpoint_name`.
    pub sd_checkpoint_name: Option<String>,
    /// `optional_info`.
    pub optional_info: Option<String>,
    /// The MLP settings.
    pub config: HypernetworkConfig,
    /// Context width (768 for SD 1.x cross-attention; 320/640/1280 for self-attention) →
    /// (module applied to the keys' context, module applied to the values' context).
    pub modules: BTreeMap<usize, (HypernetworkModule, HypernetworkModule)>,
}

/// Tensors and metadata of a safetensors file.
pub type SafetensorsParts = (BTreeMap<String, HostTensor>, HashMap<String, String>);

fn opt_str(s: &Option<String>) -> PyValue {
    s.as_ref()
        .map_or(PyValue::None, |v| PyValue::str(v.clone()))
}

fn floats(v: &[f64]) -> PyValue {
    PyValue::List(v.iter().map(|&x| PyValue::Float(x)).collect())
}

impl Hypernetwork {
    /// The dict A1111's `Hypernetwork.save` pickles.
    pub fn to_pyvalue(&self) -> Result<PyValue, String> {
        let mut items = Vec::new();
        for (&width, (k, v)) in &self.modules {
            let sd = |m: &HypernetworkModule| -> Result<PyValue, String> {
                Ok(PyValue::OrderedDict(
                    m.state_dict(width, &self.config)?
                        .into_iter()
                        .map(|(n, t)| (PyValue::Str(n), PyValue::Tensor(t)))
                        .collect(),
                ))
            };
            items.push((
                PyValue::Int(width as i64),
                PyValue::Tuple(vec![sd(k)?, sd(v)?]),
            ));
        }
        let c = &self.config;
        let dropout = c.effective_dropout_structure();
        let meta = [
            ("step", PyValue::Int(self.step as i64)),
            ("name", PyValue::str(self.name.clone())),
            ("layer_structure", floats(&c.layer_structure)),
            ("activation_func", opt_str(&c.activation_func)),
            ("is_layer_norm", PyValue::Bool(c.is_layer_norm)),
            (
                "weight_initialization",
                PyValue::str(c.weight_initialization.clone()),
            ),
            ("sd_checkpoint", opt_str(&self.sd_checkpoint)),
            ("sd_checkpoint_name", opt_str(&self.sd_checkpoint_name)),
            ("activate_output", PyValue::Bool(c.activate_output)),
            ("use_dropout", PyValue::Bool(c.use_dropout)),
            ("dropout_structure", floats(&dropout)),
            (
                "last_layer_dropout",
                PyValue::Bool(dropout.len() >= 2 && dropout[dropout.len() - 2] != 0.0),
            ),
            ("optional_info", opt_str(&self.optional_info)),
        ];
        items.extend(meta.into_iter().map(|(k, v)| (PyValue::str(k), v)));
        Ok(PyValue::Dict(items))
    }

    /// Reads the dict of an A1111 `.pt` file, with A1111's defaults for missing keys.
    pub fn from_pyvalue(value: &PyValue, default_name: &str) -> Result<Self, String> {
        let items = value
            .dict_items()
            .ok_or("the pickled object is not a dict")?;
        let get = |k: &str| value.get(k).filter(|v| **v != PyValue::None);
        let float_list = |k: &str| -> Result<Option<Vec<f64>>, String> {
            match get(k) {
                None => Ok(None),
                Some(v) => v
                    .as_seq()
                    .ok_or(format!("`{k}` is not a list"))?
                    .iter()
                    .map(|x| x.as_f64().ok_or(format!("`{k}` holds a non-number")))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some),
            }
        };
        let flag = |k: &str, default: bool| get(k).and_then(PyValue::as_bool).unwrap_or(default);
        let s = |k: &str| get(k).and_then(PyValue::as_str).map(str::to_string);
        let layer_structure = float_list("layer_structure")?.unwrap_or_else(|| vec![1.0, 2.0, 1.0]);
        let dropout_structure = float_list("dropout_structure")?;
        let use_dropout = match &dropout_structure {
            Some(d) if d.iter().any(|&p| p != 0.0) => true,
            _ => flag("use_dropout", false),
        };
        let config = HypernetworkConfig {
            layer_structure,
            activation_func: s("activation_func"),
            is_layer_norm: flag("is_layer_norm", false),
            weight_initialization: s("weight_initialization").unwrap_or_else(|| "Normal".into()),
            activate_output: flag("activate_output", true),
            use_dropout,
            dropout_structure,
            last_layer_dropout: flag("last_layer_dropout", false),
        };
        let mut modules = BTreeMap::new();
        for (k, v) in items {
            let PyValue::Int(width) = k else { continue };
            let width = usize::try_from(*width).map_err(|_| format!("negative width {width}"))?;
            let pair = v
                .as_seq()
                .filter(|p| p.len() == 2)
                .ok_or(format!("entry {width} is not a (k, v) pair of state dicts"))?;
            let load = |sd: &PyValue, which: &str| -> Result<HypernetworkModule, String> {
                let map = sd
                    .dict_items()
                    .ok_or(format!("{width}.{which} is not a state dict"))?
                    .iter()
                    .map(|(n, t)| {
                        let n = n
                            .as_str()
                            .ok_or(format!("{width}.{which}: non-string key"))?;
                        let t = t
                            .as_tensor()
                            .ok_or(format!("{width}.{which}.{n} is not a tensor"))?;
                        Ok((n.to_string(), t.clone()))
                    })
                    .collect::<Result<HashMap<_, _>, String>>()?;
                HypernetworkModule::from_state_dict(width, &config, map)
                    .map_err(|e| format!("module {width} ({which}): {e}"))
            };
            modules.insert(width, (load(&pair[0], "k")?, load(&pair[1], "v")?));
        }
        Ok(Self {
            name: s("name").unwrap_or_else(|| default_name.to_string()),
            step: get("step").and_then(PyValue::as_int).unwrap_or(0).max(0) as u64,
            sd_checkpoint: s("sd_checkpoint"),
            sd_checkpoint_name: s("sd_checkpoint_name"),
            optional_info: s("optional_info"),
            config,
            modules,
        })
    }

    /// The safetensors twin: tensors `<width>.{k,v}.<A1111 state-dict name>`, and the metadata
    /// keys of the `.pt` file as safetensors metadata (strings as is; numbers, booleans and
    /// lists as JSON).
    pub fn to_safetensors(&self) -> Result<SafetensorsParts, String> {
        let mut tensors = BTreeMap::new();
        for (&width, (k, v)) in &self.modules {
            for (which, m) in [("k", k), ("v", v)] {
                for (n, t) in m.state_dict(width, &self.config)? {
                    tensors.insert(format!("{width}.{which}.{n}"), t);
                }
            }
        }
        let c = &self.config;
        let json = |v: serde_json::Value| v.to_string();
        let mut meta = HashMap::from([
            ("name".to_string(), self.name.clone()),
            ("step".to_string(), self.step.to_string()),
            (
                "layer_structure".to_string(),
                json(serde_json::json!(c.layer_structure)),
            ),
            ("is_layer_norm".to_string(), json(c.is_layer_norm.into())),
            (
                "weight_initialization".to_string(),
                c.weight_initialization.clone(),
            ),
            (
                "activate_output".to_string(),
                json(c.activate_output.into()),
            ),
            ("use_dropout".to_string(), json(c.use_dropout.into())),
            (
                "dropout_structure".to_string(),
                json(serde_json::json!(c.effective_dropout_structure())),
            ),
            (
                "last_layer_dropout".to_string(),
                json(c.last_layer_dropout.into()),
            ),
        ]);
        for (k, v) in [
            ("activation_func", &c.activation_func),
            ("sd_checkpoint", &self.sd_checkpoint),
            ("sd_checkpoint_name", &self.sd_checkpoint_name),
            ("optional_info", &self.optional_info),
        ] {
            if let Some(v) = v {
                meta.insert(k.to_string(), v.clone());
            }
        }
        Ok((tensors, meta))
    }

    /// Rebuilds a hypernetwork from its safetensors twin.
    pub fn from_safetensors(
        tensors: &BTreeMap<String, HostTensor>,
        meta: &HashMap<String, String>,
        default_name: &str,
    ) -> Result<Self, String> {
        let parse = |k: &str| -> Result<Option<serde_json::Value>, String> {
            meta.get(k)
                .map(|v| serde_json::from_str(v).map_err(|e| format!("metadata `{k}`: {e}")))
                .transpose()
        };
        let flag = |k: &str, d: bool| -> Result<bool, String> {
            Ok(parse(k)?.and_then(|v| v.as_bool()).unwrap_or(d))
        };
        let list = |k: &str| -> Result<Option<Vec<f64>>, String> {
            match parse(k)? {
                None => Ok(None),
                Some(v) => serde_json::from_value(v)
                    .map(Some)
                    .map_err(|e| format!("metadata `{k}`: {e}")),
            }
        };
        let config = HypernetworkConfig {
            layer_structure: list("layer_structure")?.unwrap_or_else(|| vec![1.0, 2.0, 1.0]),
            activation_func: meta.get("activation_func").cloned(),
            is_layer_norm: flag("is_layer_norm", false)?,
            weight_initialization: meta
                .get("weight_initialization")
                .cloned()
                .unwrap_or_else(|| "Normal".into()),
            activate_output: flag("activate_output", true)?,
            use_dropout: flag("use_dropout", false)?,
            dropout_structure: list("dropout_structure")?,
            last_layer_dropout: flag("last_layer_dropout", false)?,
        };
        let mut parts: BTreeMap<(usize, bool), HashMap<String, HostTensor>> = BTreeMap::new();
        for (key, t) in tensors {
            let mut it = key.splitn(3, '.');
            let (Some(w), Some(which), Some(name)) = (it.next(), it.next(), it.next()) else {
                return Err(format!("`{key}` is not `<width>.<k|v>.<name>`"));
            };
            let w: usize = w
                .parse()
                .map_err(|_| format!("`{key}`: `{w}` is not a width"))?;
            let is_v = match which {
                "k" => false,
                "v" => true,
                _ => return Err(format!("`{key}`: expected `k` or `v` after the width")),
            };
            parts
                .entry((w, is_v))
                .or_default()
                .insert(name.to_string(), t.clone());
        }
        let mut modules = BTreeMap::new();
        let widths: std::collections::BTreeSet<usize> = parts.keys().map(|(w, _)| *w).collect();
        for w in widths {
            let mut take = |is_v: bool| -> Result<HypernetworkModule, String> {
                let which = if is_v { "v" } else { "k" };
                let sd = parts
                    .remove(&(w, is_v))
                    .ok_or(format!("width {w} has no `{which}` module"))?;
                HypernetworkModule::from_state_dict(w, &config, sd)
                    .map_err(|e| format!("module {w} ({which}): {e}"))
            };
            let k = take(false)?;
            let v = take(true)?;
            modules.insert(w, (k, v));
        }
        Ok(Self {
            name: meta
                .get("name")
                .cloned()
                .unwrap_or_else(|| default_name.to_string()),
            step: meta.get("step").and_then(|s| s.parse().ok()).unwrap_or(0),
            sd_checkpoint: meta.get("sd_checkpoint").cloned(),
            sd_checkpoint_name: meta.get("sd_checkpoint_name").cloned(),
            optional_info: meta.get("optional_info").cloned(),
            config,
            modules,
        })
    }
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Writes the A1111 `.pt` file (atomically).
pub fn write_hypernetwork_pt(path: &Path, hn: &Hypernetwork) -> Result<()> {
    let v = hn.to_pyvalue().map_err(|m| FormatError::invalid(path, m))?;
    write_torch(path, &v)
}

/// Writes the safetensors twin (atomically).
pub fn write_hypernetwork_safetensors(path: &Path, hn: &Hypernetwork) -> Result<()> {
    let (tensors, meta) = hn
        .to_safetensors()
        .map_err(|m| FormatError::invalid(path, m))?;
    write_safetensors(path, &tensors, Some(meta))
}

/// Reads a hypernetwork from an A1111 `.pt` file or its safetensors twin (by extension).
/// The name defaults to the file stem, as in A1111.
pub fn read_hypernetwork(path: &Path) -> Result<Hypernetwork> {
    let is_st = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    let r = if is_st {
        let st = read_safetensors(path)?;
        Hypernetwork::from_safetensors(&st.tensors, &st.metadata, &stem(path))
    } else {
        Hypernetwork::from_pyvalue(&read_torch(path)?, &stem(path))
    };
    r.map_err(|m| FormatError::invalid(path, m))
}

impl Hypernetwork {
    /// A new hypernetwork with k and v modules for each context width, initialised as A1111's
    /// `HypernetworkModule` does for `config.weight_initialization`: `Normal` → weights
    /// N(0, 0.01²); `XavierUniform` / `XavierNormal` (gain 1); `KaimingUniform` /
    /// `KaimingNormal` (fan-in, gain √2 for relu and for leakyrelu with slope 0); biases zero;
    /// LayerNorm weights N(0, 0.01²) whatever the init (as A1111 does), LayerNorm biases zero.
    /// Deterministic for `seed` (not torch's random stream).
    pub fn new(
        name: &str,
        config: HypernetworkConfig,
        widths: &[usize],
        seed: u64,
    ) -> Result<Self, String> {
        let mut rng = super::InitRng::new(seed);
        let init = config.weight_initialization.clone();
        let mut modules = BTreeMap::new();
        for &w in widths {
            let layout = sequential_layout(w, &config)?;
            let module = |rng: &mut super::InitRng| -> Result<HypernetworkModule, String> {
                let mut layers: Vec<HyperLinear> = Vec::new();
                for l in &layout {
                    match *l {
                        SeqLayer::Linear {
                            in_features,
                            out_features,
                        } => {
                            let n = in_features * out_features;
                            let (fi, fo) = (in_features as f64, out_features as f64);
                            let gain = 2f64.sqrt();
                            let data = match init.as_str() {
                                "Normal" => rng.normal(n, 0.01),
                                "XavierUniform" => rng.uniform(n, (6.0 / (fi + fo)).sqrt()),
                                "XavierNormal" => rng.normal(n, (2.0 / (fi + fo)).sqrt()),
                                "KaimingUniform" => rng.uniform(n, gain * (3.0 / fi).sqrt()),
                                "KaimingNormal" => rng.normal(n, gain / fi.sqrt()),
                                other => {
                                    return Err(format!(
                                        "weight_initialization `{other}` is not one of Normal, XavierUniform, XavierNormal, KaimingUniform, KaimingNormal"
                                    ));
                                }
                            };
                            layers.push(HyperLinear {
                                weight: HostTensor {
                                    shape: vec![out_features, in_features],
                                    data,
                                },
                                bias: HostTensor::zeros(vec![out_features]),
                                layer_norm: None,
                            });
                        }
                        SeqLayer::LayerNorm { width } => {
                            let ln = (
                                HostTensor {
                                    shape: vec![width],
                                    data: rng.normal(width, 0.01),
                                },
                                HostTensor::zeros(vec![width]),
                            );
                            if let Some(last) = layers.last_mut() {
                                last.layer_norm = Some(ln);
                            }
                        }
                        SeqLayer::Activation | SeqLayer::Dropout { .. } => {}
                    }
                }
                Ok(HypernetworkModule { layers })
            };
            let k = module(&mut rng)?;
            let v = module(&mut rng)?;
            modules.insert(w, (k, v));
        }
        Ok(Self {
            name: name.to_string(),
            step: 0,
            sd_checkpoint: None,
            sd_checkpoint_name: None,
            optional_info: None,
            config,
            modules,
        })
    }
}
