//! Textual-inversion embeddings: the A1111/kohya safetensors file (`emb_params`), the diffusers
//! file (`{token: tensor}`), and A1111's `.pt` torch file (`string_to_param` → `*`).
//!
//! An embedding is `n` vectors of the text encoder's width that replace the placeholder token
//! (which takes `n` consecutive positions in the prompt).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::torch_pickle::{PyValue, read_torch, write_torch};
use super::{FormatError, HostTensor, Result, read_safetensors, write_safetensors};

/// A textual-inversion embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    /// The token the prompt uses (`sks`, `<cat-toy>`).
    pub token: String,
    /// The vectors, `[n, d]`.
    pub vectors: HostTensor,
    /// Training steps done, when known.
    pub step: Option<u64>,
    /// A1111's `sd_checkpoint`: the short hash of the model it was trained on.
    pub sd_checkpoint: Option<String>,
    /// A1111's `sd_checkpoint_name`: that model's name.
    pub sd_checkpoint_name: Option<String>,
}

/// Layouts an embedding is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingFormat {
    /// A1111/kohya safetensors: one tensor, usually `emb_params` `[n, d]`.
    A1111Safetensors,
    /// diffusers: `{token: [d] or [n, d]}` (safetensors, or a torch `.bin`).
    Diffusers,
    /// A1111 torch `.pt`: `string_to_param: {"*": [n, d]}` plus `name`, `step`, ….
    A1111Torch,
}

impl Embedding {
    /// Number of vectors.
    pub fn num_vectors(&self) -> usize {
        self.vectors.shape[0]
    }

    /// Width of each vector.
    pub fn dim(&self) -> usize {
        self.vectors.shape[1]
    }
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `[d]` → `[1, d]`; `[n, d]` kept; anything else is an error naming `key`.
fn as_vectors(path: &Path, key: &str, mut t: HostTensor) -> Result<HostTensor> {
    match t.shape.len() {
        1 => {
            t.shape.insert(0, 1);
            Ok(t)
        }
        2 if t.shape[0] > 0 => Ok(t),
        _ => Err(FormatError::invalid(
            path,
            format!(
                "embedding tensor `{key}` has shape {:?}: expected [d] or [n, d]",
                t.shape
            ),
        )),
    }
}

/// Reads an embedding from a `.safetensors`, `.pt` or `.bin` file.
///
/// The token is `token` when given; otherwise the diffusers key (`<sks>`), or, for A1111
/// files (`emb_params`, `string_to_param`), the file stem as A1111 names embeddings.
pub fn read_embedding(path: &Path, token: Option<&str>) -> Result<(Embedding, EmbeddingFormat)> {
    let is_safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if is_safetensors {
        let st = read_safetensors(path)?;
        let meta = st.metadata;
        let mut tensors = st.tensors;
        if tensors.contains_key("clip_l") || tensors.contains_key("clip_g") {
            return Err(FormatError::invalid(
                path,
                "tensors `clip_l`/`clip_g`: an SDXL embedding, not an SD 1.x one",
            ));
        }
        let (key, t, format) = if let Some(t) = tensors.remove("emb_params") {
            (
                "emb_params".to_string(),
                t,
                EmbeddingFormat::A1111Safetensors,
            )
        } else if tensors.len() == 1 {
            let (k, t) = tensors
                .pop_first()
                .ok_or_else(|| FormatError::invalid(path, "no tensors"))?;
            (k, t, EmbeddingFormat::Diffusers)
        } else {
            let keys: Vec<&str> = tensors.keys().map(String::as_str).take(5).collect();
            return Err(FormatError::invalid(
                path,
                format!(
                    "{} tensors ({}…) and no `emb_params`: an embedding file holds one tensor",
                    tensors.len(),
                    keys.join(", ")
                ),
            ));
        };
        let vectors = as_vectors(path, &key, t)?;
        let token = match (token, format) {
            (Some(t), _) => t.to_string(),
            (None, EmbeddingFormat::Diffusers) => key,
            _ => file_stem(path),
        };
        let emb = Embedding {
            token,
            vectors,
            step: meta.get("step").and_then(|s| s.parse().ok()),
            sd_checkpoint: meta.get("sd_checkpoint").cloned(),
            sd_checkpoint_name: meta.get("sd_checkpoint_name").cloned(),
        };
        return Ok((emb, format));
    }
    let value = read_torch(path)?;
    if value.dict_items().is_none() {
        return Err(FormatError::invalid(
            path,
            "the pickled object is not a dict",
        ));
    }
    if let Some(stp) = value.get("string_to_param") {
        let items = stp
            .dict_items()
            .ok_or_else(|| FormatError::invalid(path, "`string_to_param` is not a dict"))?;
        let [(k, v)] = items else {
            return Err(FormatError::invalid(
                path,
                format!(
                    "`string_to_param` holds {} entries, expected one (`*`)",
                    items.len()
                ),
            ));
        };
        let key = format!("string_to_param.{}", k.as_str().unwrap_or("?"));
        let t = v
            .as_tensor()
            .ok_or_else(|| FormatError::invalid(path, format!("`{key}` is not a tensor")))?;
        let vectors = as_vectors(path, &key, t.clone())?;
        let s = |k: &str| value.get(k).and_then(PyValue::as_str).map(str::to_string);
        let emb = Embedding {
            token: token.map(str::to_string).unwrap_or_else(|| file_stem(path)),
            vectors,
            step: value
                .get("step")
                .and_then(PyValue::as_int)
                .map(|v| v.max(0) as u64),
            sd_checkpoint: s("sd_checkpoint"),
            sd_checkpoint_name: s("sd_checkpoint_name"),
        };
        return Ok((emb, EmbeddingFormat::A1111Torch));
    }
    // diffusers `learned_embeds.bin` / kohya `.pt`: {token: tensor} or {"emb_params": tensor}.
    let items = value.dict_items().unwrap_or_default();
    let tensors: Vec<(&str, &HostTensor)> = items
        .iter()
        .filter_map(|(k, v)| Some((k.as_str()?, v.as_tensor()?)))
        .collect();
    let (key, t) = match tensors.as_slice() {
        [one] => *one,
        _ => match tensors.iter().find(|(k, _)| *k == "emb_params") {
            Some(e) => *e,
            None => {
                return Err(FormatError::invalid(
                    path,
                    format!(
                        "{} tensors and no `string_to_param` / `emb_params`: not an embedding",
                        tensors.len()
                    ),
                ));
            }
        },
    };
    let vectors = as_vectors(path, key, t.clone())?;
    let (token, format) = match (token, key) {
        (Some(t), _) => (t.to_string(), EmbeddingFormat::Diffusers),
        (None, "emb_params") => (file_stem(path), EmbeddingFormat::A1111Safetensors),
        (None, k) => (k.to_string(), EmbeddingFormat::Diffusers),
    };
    Ok((
        Embedding {
            token,
            vectors,
            step: None,
            sd_checkpoint: None,
            sd_checkpoint_name: None,
        },
        format,
    ))
}

/// Writes the A1111/kohya safetensors file: `{"emb_params": [n, d]}` with metadata `name`,
/// `step`, `sd_checkpoint`, `sd_checkpoint_name` (those that are set).
pub fn write_a1111_safetensors(path: &Path, emb: &Embedding) -> Result<()> {
    let tensors = BTreeMap::from([("emb_params".to_string(), emb.vectors.clone())]);
    let mut meta = HashMap::from([("name".to_string(), emb.token.clone())]);
    if let Some(s) = emb.step {
        meta.insert("step".into(), s.to_string());
    }
    if let Some(s) = &emb.sd_checkpoint {
        meta.insert("sd_checkpoint".into(), s.clone());
    }
    if let Some(s) = &emb.sd_checkpoint_name {
        meta.insert("sd_checkpoint_name".into(), s.clone());
    }
    write_safetensors(path, &tensors, Some(meta))
}

/// Writes the diffusers file `{token: [n, d]}` (what `load_textual_inversion` reads).
pub fn write_diffusers(path: &Path, emb: &Embedding) -> Result<()> {
    let tensors = BTreeMap::from([(emb.token.clone(), emb.vectors.clone())]);
    write_safetensors(path, &tensors, None)
}

/// Writes A1111's `.pt` embedding: `{"string_to_token": {"*": 265}, "string_to_param":
/// {"*": [n, d]}, "name", "step", "sd_checkpoint", "sd_checkpoint_name"}` as a torch archive.
pub fn write_a1111_pt(path: &Path, emb: &Embedding) -> Result<()> {
    let opt = |s: &Option<String>| {
        s.as_ref()
            .map_or(PyValue::None, |v| PyValue::str(v.clone()))
    };
    let value = PyValue::Dict(vec![
        (
            PyValue::str("string_to_token"),
            PyValue::Dict(vec![(PyValue::str("*"), PyValue::Int(265))]),
        ),
        (
            PyValue::str("string_to_param"),
            PyValue::Dict(vec![(
                PyValue::str("*"),
                PyValue::Tensor(emb.vectors.clone()),
            )]),
        ),
        (PyValue::str("name"), PyValue::str(emb.token.clone())),
        (
            PyValue::str("step"),
            PyValue::Int(emb.step.unwrap_or(0) as i64),
        ),
        (PyValue::str("sd_checkpoint"), opt(&emb.sd_checkpoint)),
        (
            PyValue::str("sd_checkpoint_name"),
            opt(&emb.sd_checkpoint_name),
        ),
    ]);
    write_torch(path, &value)
}
