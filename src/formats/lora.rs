//! LoRA networks: one in-memory form ([`LoraNetwork`]) read from kohya sd-scripts files,
//! diffusers `pytorch_lora_weights.safetensors` files and PEFT adapter directories, and written
//! in the kohya format that A1111, ComfyUI and diffusers all load.
//!
//! Module paths are diffusers module paths: `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`
//! for the UNet, `text_model.encoder.layers.0.self_attn.q_proj` for the text encoder. For a
//! module with weight `W` (`[out, in]`, or `[out, in, kh, kw]` for a conv), the LoRA adds
//! `multiplier · (alpha / rank) · up @ down` with `down: [rank, in(, kh, kw)]`, `up: [out, rank]`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::{FormatError, HostTensor, Result, read_safetensors, write_safetensors};

/// Which model a LoRA module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraComponent {
    /// The UNet (`lora_unet_…`, `unet.…`).
    Unet,
    /// The CLIP text encoder (`lora_te_…`, `text_encoder.…`).
    TextEncoder,
}

impl LoraComponent {
    fn kohya_prefix(self) -> &'static str {
        match self {
            LoraComponent::Unet => "lora_unet_",
            LoraComponent::TextEncoder => "lora_te_",
        }
    }

    fn diffusers_prefix(self) -> &'static str {
        match self {
            LoraComponent::Unet => "unet",
            LoraComponent::TextEncoder => "text_encoder",
        }
    }
}

/// The low-rank update of one module.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    /// `[rank, in]` for a linear layer, `[rank, in, kh, kw]` for a conv (kohya `lora_down`,
    /// diffusers/PEFT `lora_A`).
    pub down: HostTensor,
    /// `[out, rank]` (kohya `lora_up`, diffusers/PEFT `lora_B`; conv files store
    /// `[out, rank, 1, 1]`, normalised here).
    pub up: HostTensor,
    /// The network alpha: the update is scaled by `alpha / rank`.
    pub alpha: f32,
}

impl LoraModule {
    /// A freshly initialised module for a weight of shape `[out, in]` or `[out, in, kh, kw]`,
    /// as kohya and PEFT initialise one: `down` kaiming-uniform with a = √5 (uniform in
    /// ±1/√fan_in, fan_in = in·kh·kw), `up` zero, so the network starts as the identity.
    /// Deterministic for `seed`.
    pub fn init(
        weight_shape: &[usize],
        rank: usize,
        alpha: f32,
        seed: u64,
    ) -> Result<Self, String> {
        if !(weight_shape.len() == 2 || weight_shape.len() == 4) || rank == 0 {
            return Err(format!(
                "cannot make a rank-{rank} LoRA for a weight of shape {weight_shape:?}"
            ));
        }
        let fan_in: usize = weight_shape[1..].iter().product();
        let mut down_shape = vec![rank];
        down_shape.extend_from_slice(&weight_shape[1..]);
        let mut rng = super::InitRng::new(seed);
        let down = HostTensor {
            data: rng.uniform(rank * fan_in, 1.0 / (fan_in as f64).sqrt()),
            shape: down_shape,
        };
        Ok(Self {
            down,
            up: HostTensor::zeros(vec![weight_shape[0], rank]),
            alpha,
        })
    }

    /// The rank (rows of `down`).
    pub fn rank(&self) -> usize {
        self.down.shape[0]
    }

    /// Whether this is a conv LoRA (4-d `down`).
    pub fn is_conv(&self) -> bool {
        self.down.shape.len() == 4
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank() as f32
    }

    /// The weight shape this module applies to: `[out, in]` or `[out, in, kh, kw]`.
    pub fn weight_shape(&self) -> Vec<usize> {
        let mut s = vec![self.up.shape[0]];
        s.extend_from_slice(&self.down.shape[1..]);
        s
    }

    /// `multiplier · (alpha / rank) · up @ down`, shaped like the module weight.
    pub fn delta(&self, multiplier: f32) -> HostTensor {
        let r = self.rank();
        let out = self.up.shape[0];
        let cols = self.down.numel() / r; // in · kh · kw
        let s = multiplier * self.scale();
        let mut data = vec![0.0f32; out * cols];
        for o in 0..out {
            let row = &mut data[o * cols..(o + 1) * cols];
            for k in 0..r {
                let u = self.up.data[o * r + k];
                let d = &self.down.data[k * cols..(k + 1) * cols];
                for (acc, dv) in row.iter_mut().zip(d) {
                    *acc += u * dv;
                }
            }
            for v in row.iter_mut() {
                *v *= s;
            }
        }
        HostTensor {
            shape: self.weight_shape(),
            data,
        }
    }

    /// Adds [`delta`](Self::delta) to `weight` in place (`W + multiplier · alpha/rank · up@down`).
    /// Fails when the shapes differ.
    pub fn merge_into(&self, weight: &mut HostTensor, multiplier: f32) -> Result<(), String> {
        if weight.shape != self.weight_shape() {
            return Err(format!(
                "LoRA expects a weight of shape {:?}, the model's is {:?}",
                self.weight_shape(),
                weight.shape
            ));
        }
        let d = self.delta(multiplier);
        for (w, dv) in weight.data.iter_mut().zip(&d.data) {
            *w += dv;
        }
        Ok(())
    }
}

/// A LoRA network: modules by diffusers module path, per component.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraNetwork {
    /// UNet modules (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`, …).
    pub unet: BTreeMap<String, LoraModule>,
    /// Text-encoder modules (`text_model.encoder.layers.0.self_attn.q_proj`, …).
    pub text_encoder: BTreeMap<String, LoraModule>,
}

impl LoraNetwork {
    /// The modules of one component.
    pub fn modules(&self, component: LoraComponent) -> &BTreeMap<String, LoraModule> {
        match component {
            LoraComponent::Unet => &self.unet,
            LoraComponent::TextEncoder => &self.text_encoder,
        }
    }

    /// The modules of one component, mutably.
    pub fn modules_mut(&mut self, component: LoraComponent) -> &mut BTreeMap<String, LoraModule> {
        match component {
            LoraComponent::Unet => &mut self.unet,
            LoraComponent::TextEncoder => &mut self.text_encoder,
        }
    }

    /// All modules with their component.
    pub fn iter(&self) -> impl Iterator<Item = (LoraComponent, &String, &LoraModule)> {
        self.unet
            .iter()
            .map(|(k, m)| (LoraComponent::Unet, k, m))
            .chain(
                self.text_encoder
                    .iter()
                    .map(|(k, m)| (LoraComponent::TextEncoder, k, m)),
            )
    }

    /// Number of modules.
    pub fn len(&self) -> usize {
        self.unet.len() + self.text_encoder.len()
    }

    /// Whether there are no modules.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks every module against the model's weight shapes; the error names the module and
    /// the shapes, or lists some of the available module names when the model lacks it.
    pub fn check_against(&self, known: &KnownModules) -> Result<(), String> {
        for (component, path, m) in self.iter() {
            let shapes = known.component(component);
            let Some(w) = shapes.get(path) else {
                let avail: Vec<&str> = shapes.keys().take(8).map(String::as_str).collect();
                return Err(format!(
                    "LoRA module `{path}` ({component:?}) is not in the model; available modules include: {}",
                    avail.join(", ")
                ));
            };
            if *w != m.weight_shape() {
                return Err(format!(
                    "LoRA module `{path}` ({component:?}) has down {:?} / up {:?}, which does not fit the model weight {:?}",
                    m.down.shape, m.up.shape, w
                ));
            }
        }
        Ok(())
    }
}

/// The model's LoRA-able modules and their weight shapes (`[out, in]` or `[out, in, kh, kw]`),
/// used to map kohya's underscore names back to module paths and to check shapes.
#[derive(Debug, Clone, Default)]
pub struct KnownModules {
    /// UNet module path → weight shape.
    pub unet: BTreeMap<String, Vec<usize>>,
    /// Text-encoder module path → weight shape.
    pub text_encoder: BTreeMap<String, Vec<usize>>,
}

impl KnownModules {
    /// Builds the lists from `(weight key, shape)` pairs of a diffusers state dict: every
    /// 2-d or 4-d `<module>.weight` becomes a module. `text_encoder` keys are those starting
    /// with `text_model.`.
    pub fn from_weights<'a>(weights: impl IntoIterator<Item = (&'a str, &'a [usize])>) -> Self {
        let mut k = KnownModules::default();
        for (key, shape) in weights {
            let Some(module) = key.strip_suffix(".weight") else {
                continue;
            };
            if shape.len() != 2 && shape.len() != 4 {
                continue;
            }
            if module.starts_with("text_model.") {
                k.text_encoder.insert(module.to_string(), shape.to_vec());
            } else {
                k.unet.insert(module.to_string(), shape.to_vec());
            }
        }
        k
    }

    fn component(&self, c: LoraComponent) -> &BTreeMap<String, Vec<usize>> {
        match c {
            LoraComponent::Unet => &self.unet,
            LoraComponent::TextEncoder => &self.text_encoder,
        }
    }
}

/// The on-disk LoRA layouts this module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// kohya sd-scripts: `lora_unet_<path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`.
    Kohya,
    /// diffusers: `unet.<path>.lora_A.weight` / `.lora_B.weight`, alpha in `lora_adapter_metadata`.
    Diffusers,
    /// PEFT: `base_model.model.<path>.lora_{A,B}.weight` + `adapter_config.json`.
    Peft,
}

/// Reads a LoRA file or directory in any supported layout, detecting which.
///
/// `path` may be a kohya or diffusers `.safetensors` file, a diffusers directory holding
/// `pytorch_lora_weights.safetensors`, or a PEFT directory holding `adapter_model.safetensors`
/// (and `adapter_config.json`). `known` (the model's modules) resolves kohya names exactly
/// and checks shapes; without it kohya names are resolved with the SD 1.x module vocabulary.
pub fn read_lora(path: &Path, known: Option<&KnownModules>) -> Result<(LoraNetwork, LoraFormat)> {
    let (file, config) = if path.is_dir() {
        let peft = path.join("adapter_model.safetensors");
        let diffusers = path.join("pytorch_lora_weights.safetensors");
        if peft.is_file() {
            (peft, Some(path.join("adapter_config.json")))
        } else if diffusers.is_file() {
            (diffusers, None)
        } else {
            return Err(FormatError::invalid(
                path,
                "directory holds neither adapter_model.safetensors (PEFT) nor pytorch_lora_weights.safetensors (diffusers)",
            ));
        }
    } else {
        let sibling = path.with_file_name("adapter_config.json");
        (path.to_path_buf(), sibling.is_file().then_some(sibling))
    };
    let st = read_safetensors(&file)?;
    let Some(first) = st.tensors.keys().next() else {
        return Err(FormatError::invalid(&file, "the file holds no tensors"));
    };
    let format = if first.starts_with("lora_") {
        LoraFormat::Kohya
    } else if first.starts_with("base_model.model.") {
        LoraFormat::Peft
    } else if first.starts_with("unet.") || first.starts_with("text_encoder.") {
        LoraFormat::Diffusers
    } else {
        return Err(FormatError::invalid(
            &file,
            format!(
                "`{first}` is not a kohya (`lora_unet_…`), diffusers (`unet.…`) or PEFT (`base_model.model.…`) LoRA key"
            ),
        ));
    };
    let net = match format {
        LoraFormat::Kohya => decode_kohya(&file, st.tensors, known)?,
        LoraFormat::Diffusers => {
            let meta = match st.metadata.get("lora_adapter_metadata") {
                Some(json) => Some(serde_json::from_str::<serde_json::Value>(json).map_err(
                    |e| {
                        FormatError::invalid(
                            &file,
                            format!("metadata `lora_adapter_metadata`: {e}"),
                        )
                    },
                )?),
                None => None,
            };
            decode_ab(
                &file,
                st.tensors,
                &|key| {
                    for c in [LoraComponent::Unet, LoraComponent::TextEncoder] {
                        if let Some(rest) = key
                            .strip_prefix(c.diffusers_prefix())
                            .and_then(|r| r.strip_prefix('.'))
                        {
                            return Some((c, rest.to_string()));
                        }
                    }
                    None
                },
                &|c, module| {
                    let meta = meta.as_ref()?;
                    let p = c.diffusers_prefix();
                    pattern_alpha(meta.get(format!("{p}.alpha_pattern")), module)
                        .or_else(|| meta.get(format!("{p}.lora_alpha")).and_then(|v| v.as_f64()))
                },
            )?
        }
        LoraFormat::Peft => {
            let cfg = match &config {
                Some(c) if c.is_file() => {
                    let text = std::fs::read_to_string(c).map_err(|e| FormatError::io(c, e))?;
                    Some(
                        serde_json::from_str::<serde_json::Value>(&text)
                            .map_err(|e| FormatError::invalid(c, format!("not valid JSON: {e}")))?,
                    )
                }
                _ => None,
            };
            decode_ab(
                &file,
                st.tensors,
                &|key| {
                    let rest = key.strip_prefix("base_model.model.")?;
                    let c = if rest.starts_with("text_model.") {
                        LoraComponent::TextEncoder
                    } else {
                        LoraComponent::Unet
                    };
                    Some((c, rest.to_string()))
                },
                &|_, module| {
                    let cfg = cfg.as_ref()?;
                    pattern_alpha(cfg.get("alpha_pattern"), module)
                        .or_else(|| cfg.get("lora_alpha").and_then(|v| v.as_f64()))
                },
            )?
        }
    };
    if let Some(k) = known {
        net.check_against(k)
            .map_err(|m| FormatError::invalid(&file, m))?;
    }
    Ok((net, format))
}

/// An alpha from a PEFT `alpha_pattern` map whose key is the module path or a `.`-suffix of it.
fn pattern_alpha(pattern: Option<&serde_json::Value>, module: &str) -> Option<f64> {
    let map = pattern?.as_object()?;
    map.iter()
        .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
        .and_then(|(_, v)| v.as_f64())
}

type SplitKey<'a> = &'a dyn Fn(&str) -> Option<(LoraComponent, String)>;
type AlphaOf<'a> = &'a dyn Fn(LoraComponent, &str) -> Option<f64>;

/// Decodes `<prefix><module>.lora_A.weight` / `.lora_B.weight` pairs (diffusers and PEFT).
fn decode_ab(
    file: &Path,
    tensors: BTreeMap<String, HostTensor>,
    split: SplitKey,
    alpha_of: AlphaOf,
) -> Result<LoraNetwork> {
    let mut downs: BTreeMap<(LoraComponent, String), (String, HostTensor)> = BTreeMap::new();
    let mut ups: BTreeMap<(LoraComponent, String), (String, HostTensor)> = BTreeMap::new();
    for (key, t) in tensors {
        let (target, is_down) = if let Some(m) = key.strip_suffix(".lora_A.weight") {
            (m, true)
        } else if let Some(m) = key.strip_suffix(".lora_B.weight") {
            (m, false)
        } else {
            return Err(FormatError::invalid(
                file,
                format!("`{key}` is not a `.lora_A.weight` / `.lora_B.weight` tensor"),
            ));
        };
        let Some((component, module)) = split(target) else {
            return Err(FormatError::invalid(
                file,
                format!("`{key}` does not start with a known component prefix"),
            ));
        };
        check_not_ldm(file, &key, &module)?;
        let slot = if is_down { &mut downs } else { &mut ups };
        slot.insert((component, module), (key, t));
    }
    let mut net = LoraNetwork::default();
    for ((component, module), (dkey, down)) in downs {
        let Some((ukey, up)) = ups.remove(&(component, module.clone())) else {
            return Err(FormatError::invalid(
                file,
                format!("`{dkey}` has no matching lora_B tensor"),
            ));
        };
        let alpha = alpha_of(component, &module);
        let m = build_module(file, &dkey, &ukey, down, up, alpha.map(|a| a as f32))?;
        net.modules_mut(component).insert(module, m);
    }
    if let Some(((_, _), (ukey, _))) = ups.into_iter().next() {
        return Err(FormatError::invalid(
            file,
            format!("`{ukey}` has no matching lora_A tensor"),
        ));
    }
    Ok(net)
}

/// Validates and normalises one module's tensors; `alpha` defaults to the rank.
fn build_module(
    file: &Path,
    down_key: &str,
    up_key: &str,
    down: HostTensor,
    mut up: HostTensor,
    alpha: Option<f32>,
) -> Result<LoraModule> {
    if down.shape.len() != 2 && down.shape.len() != 4 {
        return Err(FormatError::invalid(
            file,
            format!(
                "`{down_key}` has shape {:?}: expected [rank, in] or [rank, in, kh, kw]",
                down.shape
            ),
        ));
    }
    if up.shape.len() == 4 && up.shape[2] == 1 && up.shape[3] == 1 {
        up.shape.truncate(2);
    }
    let rank = down.shape[0];
    if up.shape.len() != 2 || up.shape[1] != rank || rank == 0 {
        return Err(FormatError::invalid(
            file,
            format!(
                "`{up_key}` has shape {:?}, which does not fit `{down_key}` {:?}: expected [out, {rank}]",
                up.shape, down.shape
            ),
        ));
    }
    Ok(LoraModule {
        down,
        up,
        alpha: alpha.unwrap_or(rank as f32),
    })
}

/// LDM (original / SDXL) UNet block names: such a file does not fit a diffusers-structured SD 1.x UNet.
fn check_not_ldm(file: &Path, key: &str, module: &str) -> Result<()> {
    const LDM: [&str; 4] = ["input_blocks", "middle_block", "output_blocks", "label_emb"];
    if LDM.iter().any(|n| module.starts_with(n)) {
        return Err(FormatError::invalid(
            file,
            format!(
                "`{key}` uses LDM block names (input_blocks/middle_block/output_blocks), as SDXL LoRAs do: not an SD 1.x LoRA"
            ),
        ));
    }
    Ok(())
}

/// Segment names (containing `_`) of SD 1.x UNet and CLIP module paths, longest first, used to
/// undo kohya's `.` → `_` replacement when no module list is given.
const UNDERSCORED_SEGMENTS: &[&str] = &[
    "final_layer_norm",
    "time_emb_proj",
    "conv_norm_out",
    "transformer_blocks",
    "position_embedding",
    "token_embedding",
    "conv_shortcut",
    "time_embedding",
    "down_blocks",
    "layer_norm1",
    "layer_norm2",
    "text_model",
    "mid_block",
    "up_blocks",
    "self_attn",
    "conv_out",
    "proj_out",
    "out_proj",
    "linear_1",
    "linear_2",
    "conv_in",
    "proj_in",
    "q_proj",
    "k_proj",
    "v_proj",
    "to_out",
    "to_q",
    "to_k",
    "to_v",
];

/// Plain (underscore-free) segment names of SD 1.x UNet and CLIP module paths.
const PLAIN_SEGMENTS: &[&str] = &[
    "attentions",
    "resnets",
    "downsamplers",
    "upsamplers",
    "attn1",
    "attn2",
    "ff",
    "net",
    "proj",
    "norm",
    "norm1",
    "norm2",
    "norm3",
    "conv",
    "conv1",
    "conv2",
    "encoder",
    "layers",
    "mlp",
    "fc1",
    "fc2",
    "embeddings",
];

/// Resolves kohya's underscore name (after `lora_unet_` / `lora_te_`) to a module path with the
/// SD 1.x segment vocabulary.
fn resolve_by_vocabulary(name: &str) -> Option<String> {
    let toks: Vec<&str> = name.split('_').collect();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    'outer: while i < toks.len() {
        for n in (2..=3).rev() {
            if i + n <= toks.len() {
                let joined = toks[i..i + n].join("_");
                if UNDERSCORED_SEGMENTS.contains(&joined.as_str()) {
                    out.push(joined);
                    i += n;
                    continue 'outer;
                }
            }
        }
        let t = toks[i];
        if t.chars().all(|c| c.is_ascii_digit()) && !t.is_empty() || PLAIN_SEGMENTS.contains(&t) {
            out.push(t.to_string());
            i += 1;
        } else {
            return None;
        }
    }
    Some(out.join("."))
}

/// Decodes kohya keys `lora_{unet,te}_<name>.{lora_down.weight,lora_up.weight,alpha}`.
fn decode_kohya(
    file: &Path,
    tensors: BTreeMap<String, HostTensor>,
    known: Option<&KnownModules>,
) -> Result<LoraNetwork> {
    // Exact lookup tables from the model's module list, when given.
    let tables: Option<[HashMap<String, String>; 2]> = known.map(|k| {
        let t = |m: &BTreeMap<String, Vec<usize>>| {
            m.keys()
                .map(|p| (p.replace('.', "_"), p.clone()))
                .collect::<HashMap<_, _>>()
        };
        [t(&k.unet), t(&k.text_encoder)]
    });
    #[derive(Default)]
    struct Parts {
        down: Option<(String, HostTensor)>,
        up: Option<(String, HostTensor)>,
        alpha: Option<(String, HostTensor)>,
    }
    let mut parts: BTreeMap<(LoraComponent, String), Parts> = BTreeMap::new();
    for (key, t) in tensors {
        let Some((name, part)) = key.split_once('.') else {
            return Err(FormatError::invalid(
                file,
                format!("`{key}` is not a kohya LoRA key"),
            ));
        };
        if name.starts_with("lora_te1_") || name.starts_with("lora_te2_") {
            return Err(FormatError::invalid(
                file,
                format!("`{key}` names a second text encoder (SDXL LoRA): not an SD 1.x LoRA"),
            ));
        }
        let (component, rest) = if let Some(r) = name.strip_prefix("lora_unet_") {
            (LoraComponent::Unet, r)
        } else if let Some(r) = name.strip_prefix("lora_te_") {
            (LoraComponent::TextEncoder, r)
        } else {
            return Err(FormatError::invalid(
                file,
                format!("`{key}` starts with neither `lora_unet_` nor `lora_te_`"),
            ));
        };
        check_not_ldm(file, &key, rest)?;
        let module = match &tables {
            Some(tables) => {
                let idx = usize::from(component == LoraComponent::TextEncoder);
                tables[idx].get(rest).cloned().ok_or_else(|| {
                    FormatError::invalid(
                        file,
                        format!("`{key}`: the model has no {component:?} module named `{rest}` (with `.` as `_`)"),
                    )
                })?
            }
            None => resolve_by_vocabulary(rest).ok_or_else(|| {
                FormatError::invalid(
                    file,
                    format!("`{key}`: `{rest}` is not an SD 1.x module name"),
                )
            })?,
        };
        let entry = parts.entry((component, module)).or_default();
        let slot = match part {
            "lora_down.weight" => &mut entry.down,
            "lora_up.weight" => &mut entry.up,
            "alpha" => &mut entry.alpha,
            _ => {
                return Err(FormatError::invalid(
                    file,
                    format!(
                        "`{key}`: unsupported part `{part}` (LoHa/LoKr and other LyCORIS networks are not supported)"
                    ),
                ));
            }
        };
        *slot = Some((key, t));
    }
    let mut net = LoraNetwork::default();
    for ((component, module), p) in parts {
        let name = format!("{}{}", component.kohya_prefix(), module.replace('.', "_"));
        let (Some((dkey, down)), Some((ukey, up))) = (p.down, p.up) else {
            return Err(FormatError::invalid(
                file,
                format!("`{name}` needs both `.lora_down.weight` and `.lora_up.weight`"),
            ));
        };
        let alpha = match p.alpha {
            Some((akey, a)) => {
                if a.numel() != 1 {
                    return Err(FormatError::invalid(
                        file,
                        format!("`{akey}` has shape {:?}: expected a scalar", a.shape),
                    ));
                }
                Some(a.data[0])
            }
            None => None,
        };
        let m = build_module(file, &dkey, &ukey, down, up, alpha)?;
        net.modules_mut(component).insert(module, m);
    }
    Ok(net)
}

/// Training facts written as kohya `ss_*` metadata. `None` fields are left out.
#[derive(Debug, Clone, Default)]
pub struct KohyaMetadata {
    /// `ss_sd_model_name`: the base model's file name.
    pub base_model_name: Option<String>,
    /// `ss_sd_model_hash`: A1111's legacy 8-hex hash of the base model.
    pub base_model_hash: Option<String>,
    /// `ss_new_sd_model_hash`: sha256 of the base model file.
    pub base_model_sha256: Option<String>,
    /// `ss_output_name`.
    pub output_name: Option<String>,
    /// `ss_steps`: optimiser steps done.
    pub steps: Option<u64>,
    /// `ss_max_train_steps`.
    pub max_train_steps: Option<u64>,
    /// `ss_resolution`, written as kohya does: `(width, height)`.
    pub resolution: Option<(u32, u32)>,
    /// `ss_learning_rate`.
    pub learning_rate: Option<f64>,
    /// `ss_unet_lr`.
    pub unet_lr: Option<f64>,
    /// `ss_text_encoder_lr`.
    pub text_encoder_lr: Option<f64>,
    /// `ss_lr_scheduler`.
    pub lr_scheduler: Option<String>,
    /// `ss_optimizer`.
    pub optimizer: Option<String>,
    /// `ss_seed`.
    pub seed: Option<u64>,
    /// `ss_num_train_images`.
    pub num_train_images: Option<u64>,
    /// `ss_dataset_dirs`: directory → (repeats, image count), written as kohya's JSON
    /// `{"dir": {"n_repeats": r, "img_count": n}}`.
    pub dataset_dirs: BTreeMap<String, (u32, u64)>,
    /// `ss_tag_frequency`: directory → tag → count (kohya's JSON).
    pub tag_frequency: BTreeMap<String, BTreeMap<String, u64>>,
    /// `ss_training_comment`.
    pub training_comment: Option<String>,
    /// Any further metadata, written as is.
    pub extra: BTreeMap<String, String>,
}

/// Formats a float as Python's `str(float)` does for ordinary values (`2.0`, `0.0001`).
fn py_float(v: f64) -> String {
    format!("{v:?}")
}

impl KohyaMetadata {
    /// The safetensors metadata map for `net`: `ss_network_module` `networks.lora`,
    /// `ss_network_dim` / `ss_network_alpha` (from the first module), `ss_base_model_version`
    /// `sd_v1`, then the fields that are set.
    pub fn to_map(&self, net: &LoraNetwork) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert("ss_network_module".into(), "networks.lora".into());
        m.insert("ss_base_model_version".into(), "sd_v1".into());
        m.insert("ss_v2".into(), "False".into());
        if let Some((_, _, first)) = net.iter().next() {
            m.insert("ss_network_dim".into(), first.rank().to_string());
            m.insert("ss_network_alpha".into(), py_float(first.alpha as f64));
        }
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put("ss_sd_model_name", self.base_model_name.clone());
        put("ss_sd_model_hash", self.base_model_hash.clone());
        put("ss_new_sd_model_hash", self.base_model_sha256.clone());
        put("ss_output_name", self.output_name.clone());
        put("ss_steps", self.steps.map(|v| v.to_string()));
        put(
            "ss_max_train_steps",
            self.max_train_steps.map(|v| v.to_string()),
        );
        put(
            "ss_resolution",
            self.resolution.map(|(w, h)| format!("({w}, {h})")),
        );
        put("ss_learning_rate", self.learning_rate.map(py_float));
        put("ss_unet_lr", self.unet_lr.map(py_float));
        put("ss_text_encoder_lr", self.text_encoder_lr.map(py_float));
        put("ss_lr_scheduler", self.lr_scheduler.clone());
        put("ss_optimizer", self.optimizer.clone());
        put("ss_seed", self.seed.map(|v| v.to_string()));
        put(
            "ss_num_train_images",
            self.num_train_images.map(|v| v.to_string()),
        );
        put("ss_training_comment", self.training_comment.clone());
        if !self.dataset_dirs.is_empty() {
            let dirs: serde_json::Map<String, serde_json::Value> = self
                .dataset_dirs
                .iter()
                .map(|(d, (r, n))| {
                    (
                        d.clone(),
                        serde_json::json!({"n_repeats": r, "img_count": n}),
                    )
                })
                .collect();
            put(
                "ss_dataset_dirs",
                Some(serde_json::Value::Object(dirs).to_string()),
            );
        }
        if !self.tag_frequency.is_empty() {
            put(
                "ss_tag_frequency",
                serde_json::to_string(&self.tag_frequency).ok(),
            );
        }
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        m
    }
}

/// The kohya key stem of a module (`lora_unet_down_blocks_0_…_to_q`).
pub fn kohya_name(component: LoraComponent, module: &str) -> String {
    format!("{}{}", component.kohya_prefix(), module.replace('.', "_"))
}

/// The kohya tensors of `net` (conv `up` written as `[out, rank, 1, 1]`).
pub fn kohya_tensors(net: &LoraNetwork) -> BTreeMap<String, HostTensor> {
    let mut t = BTreeMap::new();
    for (component, module, m) in net.iter() {
        let name = kohya_name(component, module);
        let mut up = m.up.clone();
        if m.is_conv() {
            up.shape.extend([1, 1]);
        }
        t.insert(format!("{name}.lora_down.weight"), m.down.clone());
        t.insert(format!("{name}.lora_up.weight"), up);
        t.insert(
            format!("{name}.alpha"),
            HostTensor {
                shape: vec![],
                data: vec![m.alpha],
            },
        );
    }
    t
}

/// Writes `net` as a kohya sd-scripts LoRA safetensors file (atomically) with `ss_*` metadata.
pub fn write_kohya(path: &Path, net: &LoraNetwork, meta: &KohyaMetadata) -> Result<()> {
    write_safetensors(path, &kohya_tensors(net), Some(meta.to_map(net)))
}
