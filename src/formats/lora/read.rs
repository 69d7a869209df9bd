//! Reading kohya, diffusers and PEFT LoRA files into a [`LoraNetwork`], resolving kohya's
//! underscored names against the model's modules (or the SD 1.x vocabulary).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::{
    DoraModule, HadaModule, KnownModules, KronFactor, KronModule, LoraComponent, LoraFormat,
    LoraModule, LoraNetwork, NetworkModule,
};
use crate::formats::{FormatError, HostTensor, Result, read_safetensors};

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
        net.modules_mut(component).insert(module, m.into());
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
        let Some(&part) = KNOWN_PARTS.iter().find(|p| **p == part) else {
            let hint = if part.starts_with("hada_t") || part.starts_with("lokr_t") {
                " (LyCORIS' Tucker-decomposed conv factors are not supported; train with `use_tucker = false`)"
            } else {
                " (supported: LoRA/LoCon, DoRA, LoHa and LoKr keys)"
            };
            return Err(FormatError::invalid(
                file,
                format!("`{key}`: unsupported part `{part}`{hint}"),
            ));
        };
        let entry = parts.entry((component, module)).or_default();
        entry.insert(part, (key, t));
    }
    let mut net = LoraNetwork::default();
    for ((component, module), p) in parts {
        let name = format!("{}{}", component.kohya_prefix(), module.replace('.', "_"));
        let shape = known.and_then(|k| k.component(component).get(&module).cloned());
        let m = build_kohya_module(file, &name, p, shape)?;
        net.modules_mut(component).insert(module, m);
    }
    Ok(net)
}

/// The key suffixes a kohya/LyCORIS module may have.
const KNOWN_PARTS: &[&str] = &[
    "lora_down.weight",
    "lora_up.weight",
    "alpha",
    "dora_scale",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
];

/// One module's tensors by key suffix, with their full keys.
type Parts = BTreeMap<&'static str, (String, HostTensor)>;

/// Builds one module from its parts: LoRA/LoCon (`lora_down`/`lora_up`, with `dora_scale` a
/// DoRA), LoHa (`hada_*`) or LoKr (`lokr_*`). `shape` is the model's weight when known.
fn build_kohya_module(
    file: &Path,
    name: &str,
    mut p: Parts,
    shape: Option<Vec<usize>>,
) -> Result<NetworkModule> {
    let alpha = match p.remove("alpha") {
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
    let dora = p.remove("dora_scale");
    let invalid = |msg: String| FormatError::invalid(file, format!("`{name}`: {msg}"));
    let module = if p.keys().any(|k| k.starts_with("hada_")) {
        let mut take = |k: &'static str| {
            p.remove(k)
                .map(|(_, t)| t)
                .ok_or_else(|| invalid(format!("a LoHa module needs `.{k}`")))
        };
        let (w1_a, w1_b, w2_a, w2_b) = (
            take("hada_w1_a")?,
            take("hada_w1_b")?,
            take("hada_w2_a")?,
            take("hada_w2_b")?,
        );
        let rank = w1_a.shape.get(1).copied().unwrap_or(0);
        let flat = vec![w1_a.shape[0], w1_b.numel() / rank.max(1)];
        let m = HadaModule {
            shape: shape.unwrap_or(flat),
            w1_a,
            w1_b,
            w2_a,
            w2_b,
            alpha: alpha.unwrap_or(rank as f32),
        };
        m.validate().map_err(invalid)?;
        NetworkModule::Hada(m)
    } else if p.keys().any(|k| k.starts_with("lokr_")) {
        let mut factor = |full: &'static str, a: &'static str, b: &'static str| match (
            p.remove(full),
            p.remove(a),
            p.remove(b),
        ) {
            (Some((_, t)), None, None) if t.shape.len() >= 2 => Ok(KronFactor::Full(t)),
            (None, Some((_, a)), Some((_, b)))
                if a.shape.len() == 2 && b.shape.first() == a.shape.get(1) =>
            {
                let mut b = b;
                let r = b.shape[0];
                b.shape = vec![r, b.numel() / r.max(1)];
                Ok(KronFactor::LowRank { a, b })
            }
            _ => Err(invalid(format!(
                "a LoKr module needs `.{full}` or both `.{a}` [rows, r] and `.{b}` [r, …]"
            ))),
        };
        let w1 = factor("lokr_w1", "lokr_w1_a", "lokr_w1_b")?;
        let w2 = factor("lokr_w2", "lokr_w2_a", "lokr_w2_b")?;
        let (a, c, _) = w1.matrix();
        let (b, dk, _) = w2.matrix();
        let flat = match &w2 {
            KronFactor::Full(t) if t.shape.len() == 4 => {
                vec![a * b, c * t.shape[1], t.shape[2], t.shape[3]]
            }
            _ => vec![a * b, c * dk],
        };
        let rank = w1.rank().or(w2.rank());
        let m = KronModule {
            w1,
            w2,
            alpha: alpha.unwrap_or(rank.unwrap_or(1) as f32),
            shape: shape.unwrap_or(flat),
        };
        m.delta(1.0).map_err(invalid)?;
        NetworkModule::Kron(m)
    } else {
        let (Some((dkey, down)), Some((ukey, up))) =
            (p.remove("lora_down.weight"), p.remove("lora_up.weight"))
        else {
            return Err(invalid(
                "needs both `.lora_down.weight` and `.lora_up.weight`".into(),
            ));
        };
        let lora = build_module(file, &dkey, &ukey, down, up, alpha)?;
        match dora {
            None => NetworkModule::Lora(lora),
            Some((skey, magnitude)) => {
                let inp = lora.down.shape[1];
                if magnitude.numel() != inp || magnitude.shape.first() != Some(&1) {
                    return Err(FormatError::invalid(
                        file,
                        format!(
                            "`{skey}` has shape {:?}: expected [1, {inp}] (the magnitude per input column, as LyCORIS writes it)",
                            magnitude.shape
                        ),
                    ));
                }
                return Ok(NetworkModule::Dora(DoraModule { lora, magnitude }));
            }
        }
    };
    if let Some((k, _)) = p.into_values().next().or(dora) {
        return Err(FormatError::invalid(
            file,
            format!("`{k}` does not belong with the module's other keys"),
        ));
    }
    Ok(module)
}
