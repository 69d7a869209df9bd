//! The checkpoint archive `torch.save` writes (the format of A1111 `.pt` embeddings and
//! hypernetworks), written and read without PyTorch.
//!
//! Layout (PyTorch ≥ 1.6, `_use_new_zipfile_serialization`): an uncompressed zip whose records
//! all sit under one folder (`archive/`):
//! * `archive/data.pkl`: the object, pickled with protocol 2. Each tensor is
//!   `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
//!   backward_hooks)`, where `storage` is a persistent id `("storage", torch.FloatStorage, key,
//!   location, numel)` that the loader's `persistent_load` resolves;
//! * `archive/data/<key>`: each storage's raw bytes, little-endian;
//! * `archive/byteorder`: `little`; `archive/version`: `3`.
//!
//! Record data is aligned to 64 bytes (as PyTorch's writer does, with a `FB` padding extra
//! field). The reader handles what this writer produces and ordinary torch-saved state dicts:
//! dicts, `OrderedDict`s, lists, tuples, sets, strings, numbers, `None`/bools, tensors
//! (`_rebuild_tensor_v2`, `_rebuild_parameter`) of float and integer storages (converted to
//! f32), with any strides and offsets.

use std::path::Path;

mod opcodes;
mod pickler;
mod unpickler;
mod zip;

use super::{FormatError, HostTensor, Result, write_atomic};
use zip::{ZipWriter, zip_records};

/// A Python value as stored in a torch checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum PyValue {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An `int` (within i64).
    Int(i64),
    /// A `float`.
    Float(f64),
    /// A `str`.
    Str(String),
    /// A `bytes` value (read only).
    Bytes(Vec<u8>),
    /// A `list` (sets are read as lists too).
    List(Vec<PyValue>),
    /// A `tuple`.
    Tuple(Vec<PyValue>),
    /// A `dict`, in insertion order.
    Dict(Vec<(PyValue, PyValue)>),
    /// A `collections.OrderedDict` (what `Module.state_dict()` returns).
    OrderedDict(Vec<(PyValue, PyValue)>),
    /// A tensor (written as float32; read from any float or integer storage as f32).
    Tensor(HostTensor),
}

impl PyValue {
    /// A `str` value.
    pub fn str(s: impl Into<String>) -> Self {
        PyValue::Str(s.into())
    }

    /// The items of a `dict` or `OrderedDict`.
    pub fn dict_items(&self) -> Option<&[(PyValue, PyValue)]> {
        match self {
            PyValue::Dict(items) | PyValue::OrderedDict(items) => Some(items),
            _ => None,
        }
    }

    /// The value under string key `key` of a `dict` / `OrderedDict`.
    pub fn get(&self, key: &str) -> Option<&PyValue> {
        self.dict_items()?
            .iter()
            .find(|(k, _)| matches!(k, PyValue::Str(s) if s == key))
            .map(|(_, v)| v)
    }

    /// The elements of a `list` or `tuple`.
    pub fn as_seq(&self) -> Option<&[PyValue]> {
        match self {
            PyValue::List(v) | PyValue::Tuple(v) => Some(v),
            _ => None,
        }
    }

    /// An `int` (or a bool as 0/1).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            PyValue::Int(i) => Some(*i),
            PyValue::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    /// A `float` or `int` as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            PyValue::Float(f) => Some(*f),
            PyValue::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    /// A `bool`.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            PyValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// A `str`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            PyValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A tensor.
    pub fn as_tensor(&self) -> Option<&HostTensor> {
        match self {
            PyValue::Tensor(t) => Some(t),
            _ => None,
        }
    }
}

/// Serializes `value` as `torch.save` would (zip archive, folder name `archive`).
pub fn torch_bytes(value: &PyValue) -> Result<Vec<u8>, String> {
    let (pickle, storages) = pickler::pickle(value)?;
    let mut zip = ZipWriter::default();
    zip.add("archive/data.pkl", &pickle);
    zip.add("archive/byteorder", b"little");
    for (i, s) in storages.iter().enumerate() {
        zip.add(&format!("archive/data/{i}"), s);
    }
    zip.add("archive/version", b"3\n");
    zip.finish()
}

/// Writes `value` to `path` as a torch checkpoint (atomically).
pub fn write_torch(path: &Path, value: &PyValue) -> Result<()> {
    let bytes = torch_bytes(value).map_err(|m| FormatError::invalid(path, m))?;
    write_atomic(path, &bytes)
}

/// Reads a torch checkpoint file.
pub fn read_torch(path: &Path) -> Result<PyValue> {
    let bytes = std::fs::read(path).map_err(|e| FormatError::io(path, e))?;
    parse_torch(&bytes).map_err(|m| FormatError::invalid(path, m))
}

/// Parses the bytes of a torch checkpoint.
pub fn parse_torch(bytes: &[u8]) -> Result<PyValue, String> {
    if bytes.first() == Some(&0x80) {
        return Err("legacy (pre-1.6, non-zip) torch checkpoint format is not supported".into());
    }
    if !bytes.starts_with(b"PK\x03\x04") {
        return Err("not a torch checkpoint (zip archive)".into());
    }
    let records = zip_records(bytes)?;
    let pkl = records
        .keys()
        .find(|k| k.ends_with("/data.pkl") && k.matches('/').count() == 1)
        .ok_or("no `<archive>/data.pkl` record")?
        .clone();
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    if let Some(r) = records.get(&format!("{prefix}byteorder")) {
        let order = &bytes[r.clone()];
        if order != b"little" {
            return Err(format!(
                "byteorder `{}` is not supported",
                String::from_utf8_lossy(order)
            ));
        }
    }
    unpickler::unpickle(&bytes[records[&pkl].clone()], &|key: &str| {
        records
            .get(&format!("{prefix}data/{key}"))
            .map(|r| &bytes[r.clone()])
    })
}
