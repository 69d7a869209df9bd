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

use std::collections::HashMap;
use std::path::Path;

use super::{FormatError, HostTensor, Result, write_atomic};

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

// ---------------------------------------------------------------------------------------------
// Writing

/// Pickle protocol-2 opcodes used by the writer (and read by the reader).
mod op {
    pub const PROTO: u8 = 0x80;
    pub const STOP: u8 = b'.';
    pub const MARK: u8 = b'(';
    pub const NONE: u8 = b'N';
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const LONG1: u8 = 0x8a;
    pub const BINFLOAT: u8 = b'G';
    pub const BINUNICODE: u8 = b'X';
    pub const EMPTY_LIST: u8 = b']';
    pub const APPENDS: u8 = b'e';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const TUPLE: u8 = b't';
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const EMPTY_DICT: u8 = b'}';
    pub const SETITEMS: u8 = b'u';
    pub const GLOBAL: u8 = b'c';
    pub const REDUCE: u8 = b'R';
    pub const BINPERSID: u8 = b'Q';
}

struct Pickler {
    out: Vec<u8>,
    /// Storages to write as `data/<index>`.
    storages: Vec<Vec<u8>>,
}

impl Pickler {
    fn global(&mut self, module: &str, name: &str) {
        self.out.push(op::GLOBAL);
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
    }

    fn int(&mut self, v: i64) {
        if (0..256).contains(&v) {
            self.out.extend([op::BININT1, v as u8]);
        } else if (0..65536).contains(&v) {
            self.out.push(op::BININT2);
            self.out.extend((v as u16).to_le_bytes());
        } else if let Ok(v32) = i32::try_from(v) {
            self.out.push(op::BININT);
            self.out.extend(v32.to_le_bytes());
        } else {
            // Minimal two's-complement little-endian bytes.
            let mut bytes = v.to_le_bytes().to_vec();
            while bytes.len() > 1 {
                let last = bytes[bytes.len() - 1];
                let prev_sign = bytes[bytes.len() - 2] & 0x80;
                if (last == 0 && prev_sign == 0) || (last == 0xff && prev_sign != 0) {
                    bytes.pop();
                } else {
                    break;
                }
            }
            self.out.extend([op::LONG1, bytes.len() as u8]);
            self.out.extend(bytes);
        }
    }

    fn string(&mut self, s: &str) {
        self.out.push(op::BINUNICODE);
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    fn tuple_of(
        &mut self,
        n: usize,
        items: impl FnOnce(&mut Self) -> Result<(), String>,
    ) -> Result<(), String> {
        match n {
            0 => {
                self.out.push(op::EMPTY_TUPLE);
                Ok(())
            }
            1..=3 => {
                items(self)?;
                self.out.push([op::TUPLE1, op::TUPLE2, op::TUPLE3][n - 1]);
                Ok(())
            }
            _ => {
                self.out.push(op::MARK);
                items(self)?;
                self.out.push(op::TUPLE);
                Ok(())
            }
        }
    }

    fn items(&mut self, items: &[(PyValue, PyValue)]) -> Result<(), String> {
        if !items.is_empty() {
            self.out.push(op::MARK);
            for (k, v) in items {
                self.value(k)?;
                self.value(v)?;
            }
            self.out.push(op::SETITEMS);
        }
        Ok(())
    }

    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.out.extend([op::EMPTY_TUPLE, op::REDUCE]);
    }

    fn value(&mut self, v: &PyValue) -> Result<(), String> {
        match v {
            PyValue::None => self.out.push(op::NONE),
            PyValue::Bool(b) => self.out.push(if *b { op::NEWTRUE } else { op::NEWFALSE }),
            PyValue::Int(i) => self.int(*i),
            PyValue::Float(f) => {
                self.out.push(op::BINFLOAT);
                self.out.extend(f.to_be_bytes());
            }
            PyValue::Str(s) => self.string(s),
            PyValue::Bytes(_) => {
                return Err("bytes values cannot be written (protocol 2 has no bytes type)".into());
            }
            PyValue::List(items) => {
                self.out.push(op::EMPTY_LIST);
                if !items.is_empty() {
                    self.out.push(op::MARK);
                    for it in items {
                        self.value(it)?;
                    }
                    self.out.push(op::APPENDS);
                }
            }
            PyValue::Tuple(items) => {
                self.tuple_of(items.len(), |p| items.iter().try_for_each(|it| p.value(it)))?
            }
            PyValue::Dict(items) => {
                self.out.push(op::EMPTY_DICT);
                self.items(items)?;
            }
            PyValue::OrderedDict(items) => {
                self.empty_ordered_dict();
                self.items(items)?;
            }
            PyValue::Tensor(t) => self.tensor(t)?,
        }
        Ok(())
    }

    fn tensor(&mut self, t: &HostTensor) -> Result<(), String> {
        if t.shape.iter().product::<usize>() != t.data.len() {
            return Err(format!(
                "tensor of shape {:?} holds {} values",
                t.shape,
                t.data.len()
            ));
        }
        let key = self.storages.len();
        self.storages.push(t.to_le_bytes());
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(op::MARK);
        // Persistent id of the storage.
        self.out.push(op::MARK);
        self.string("storage");
        self.global("torch", "FloatStorage");
        self.string(&key.to_string());
        self.string("cpu");
        self.int(t.data.len() as i64);
        self.out.push(op::TUPLE);
        self.out.push(op::BINPERSID);
        self.int(0); // storage offset
        let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        let mut stride = vec![1i64; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * shape[i + 1].max(1);
        }
        for dims in [&shape, &stride] {
            self.tuple_of(dims.len(), |p| {
                dims.iter().for_each(|&d| p.int(d));
                Ok(())
            })?;
        }
        self.out.push(op::NEWFALSE); // requires_grad
        self.empty_ordered_dict(); // backward_hooks
        self.out.push(op::TUPLE);
        self.out.push(op::REDUCE);
        Ok(())
    }
}

/// Serializes `value` as `torch.save` would (zip archive, folder name `archive`).
pub fn torch_bytes(value: &PyValue) -> Result<Vec<u8>, String> {
    let mut p = Pickler {
        out: vec![op::PROTO, 2],
        storages: Vec::new(),
    };
    p.value(value)?;
    p.out.push(op::STOP);
    let mut zip = ZipWriter::default();
    zip.add("archive/data.pkl", &p.out);
    zip.add("archive/byteorder", b"little");
    for (i, s) in p.storages.iter().enumerate() {
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

/// A minimal writer of uncompressed (stored) zip archives with 64-byte aligned record data.
#[derive(Default)]
struct ZipWriter {
    buf: Vec<u8>,
    central: Vec<u8>,
    count: usize,
}

const ZIP_ALIGN: usize = 64;
/// DOS date 1980-01-01.
const DOS_DATE: u16 = 0x21;

impl ZipWriter {
    fn add(&mut self, name: &str, data: &[u8]) {
        let offset = self.buf.len();
        let crc = crc32fast::hash(data);
        let base = offset + 30 + name.len();
        let mut pad = (ZIP_ALIGN - base % ZIP_ALIGN) % ZIP_ALIGN;
        if pad > 0 && pad < 4 {
            pad += ZIP_ALIGN;
        }
        let b = &mut self.buf;
        b.extend(0x0403_4b50u32.to_le_bytes());
        b.extend(20u16.to_le_bytes()); // version needed
        b.extend(0u16.to_le_bytes()); // flags
        b.extend(0u16.to_le_bytes()); // stored
        b.extend(0u16.to_le_bytes()); // time
        b.extend(DOS_DATE.to_le_bytes());
        b.extend(crc.to_le_bytes());
        b.extend((data.len() as u32).to_le_bytes());
        b.extend((data.len() as u32).to_le_bytes());
        b.extend((name.len() as u16).to_le_bytes());
        b.extend((pad as u16).to_le_bytes());
        b.extend_from_slice(name.as_bytes());
        if pad > 0 {
            b.extend(b"FB");
            b.extend(((pad - 4) as u16).to_le_bytes());
            b.extend(std::iter::repeat_n(0u8, pad - 4));
        }
        b.extend_from_slice(data);

        let c = &mut self.central;
        c.extend(0x0201_4b50u32.to_le_bytes());
        c.extend(20u16.to_le_bytes()); // made by
        c.extend(20u16.to_le_bytes()); // needed
        c.extend(0u16.to_le_bytes());
        c.extend(0u16.to_le_bytes());
        c.extend(0u16.to_le_bytes());
        c.extend(DOS_DATE.to_le_bytes());
        c.extend(crc.to_le_bytes());
        c.extend((data.len() as u32).to_le_bytes());
        c.extend((data.len() as u32).to_le_bytes());
        c.extend((name.len() as u16).to_le_bytes());
        c.extend(0u16.to_le_bytes()); // extra
        c.extend(0u16.to_le_bytes()); // comment
        c.extend(0u16.to_le_bytes()); // disk
        c.extend(0u16.to_le_bytes()); // internal attributes
        c.extend(0u32.to_le_bytes()); // external attributes
        c.extend((offset as u32).to_le_bytes());
        c.extend_from_slice(name.as_bytes());
        self.count += 1;
    }

    fn finish(mut self) -> Result<Vec<u8>, String> {
        if self.buf.len() + self.central.len() > u32::MAX as usize || self.count > 0xffff {
            return Err("archive over 4 GiB or 65535 records (zip64) is not supported".into());
        }
        let cd_offset = self.buf.len();
        let cd_size = self.central.len();
        self.buf.extend_from_slice(&self.central);
        let b = &mut self.buf;
        b.extend(0x0605_4b50u32.to_le_bytes());
        b.extend(0u16.to_le_bytes());
        b.extend(0u16.to_le_bytes());
        b.extend((self.count as u16).to_le_bytes());
        b.extend((self.count as u16).to_le_bytes());
        b.extend((cd_size as u32).to_le_bytes());
        b.extend((cd_offset as u32).to_le_bytes());
        b.extend(0u16.to_le_bytes());
        Ok(self.buf)
    }
}

// ---------------------------------------------------------------------------------------------
// Reading

fn le_u16(b: &[u8], at: usize) -> Option<usize> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?) as usize)
}

fn le_u32(b: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
}

/// The records of a stored (uncompressed) zip archive: name → data range.
fn zip_records(bytes: &[u8]) -> Result<HashMap<String, std::ops::Range<usize>>, String> {
    if bytes.len() < 22 {
        return Err("too short to be a zip archive".into());
    }
    let min = bytes.len().saturating_sub(22 + 0xffff);
    let eocd = (min..=bytes.len() - 22)
        .rev()
        .find(|&i| bytes[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or("no zip end-of-central-directory record")?;
    let bad = || "corrupt zip central directory".to_string();
    let count = le_u16(bytes, eocd + 10).ok_or_else(bad)?;
    let cd_offset = le_u32(bytes, eocd + 16).ok_or_else(bad)?;
    if count == 0xffff || cd_offset == 0xffff_ffff {
        return Err("zip64 archives (over 4 GiB) are not supported".into());
    }
    let mut records = HashMap::new();
    let mut at = cd_offset;
    for _ in 0..count {
        if le_u32(bytes, at) != Some(0x0201_4b50) {
            return Err(bad());
        }
        let method = le_u16(bytes, at + 10).ok_or_else(bad)?;
        let size = le_u32(bytes, at + 20).ok_or_else(bad)?;
        let name_len = le_u16(bytes, at + 28).ok_or_else(bad)?;
        let extra_len = le_u16(bytes, at + 30).ok_or_else(bad)?;
        let comment_len = le_u16(bytes, at + 32).ok_or_else(bad)?;
        let local = le_u32(bytes, at + 42).ok_or_else(bad)?;
        let name = bytes.get(at + 46..at + 46 + name_len).ok_or_else(bad)?;
        let name = String::from_utf8_lossy(name).into_owned();
        if method != 0 {
            return Err(format!(
                "zip record `{name}` is compressed (method {method}); torch archives are stored"
            ));
        }
        if le_u32(bytes, local) != Some(0x0403_4b50) {
            return Err(format!("zip record `{name}`: bad local header"));
        }
        let lname = le_u16(bytes, local + 26).ok_or_else(bad)?;
        let lextra = le_u16(bytes, local + 28).ok_or_else(bad)?;
        let start = local + 30 + lname + lextra;
        if start + size > bytes.len() {
            return Err(format!("zip record `{name}` runs past the end of the file"));
        }
        records.insert(name, start..start + size);
        at += 46 + name_len + extra_len + comment_len;
    }
    Ok(records)
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
    let mut u = Unpickler {
        data: &bytes[records[&pkl].clone()],
        pos: 0,
        stack: Stack::default(),
        marks: Vec::new(),
        memo: HashMap::new(),
        storage: &|key: &str| {
            records
                .get(&format!("{prefix}data/{key}"))
                .map(|r| &bytes[r.clone()])
        },
    };
    u.run()
}

/// A value on the unpickler stack: a Python value, or something only meaningful as an
/// argument (a global, a storage reference).
#[derive(Debug, Clone)]
enum Item {
    Value(PyValue),
    Global(String, String),
    Storage {
        dtype: safetensors::Dtype,
        data: Vec<u8>,
    },
    /// A tuple holding globals or storages (a persistent id, `_rebuild_tensor_v2` arguments).
    RawTuple(Vec<Item>),
}

/// A tuple item: a plain `PyValue::Tuple` when every element is a value.
fn make_tuple(items: Vec<Item>) -> Item {
    if items.iter().all(|i| matches!(i, Item::Value(_))) {
        let vals = items
            .into_iter()
            .filter_map(|i| match i {
                Item::Value(v) => Some(v),
                _ => None,
            })
            .collect();
        Item::Value(PyValue::Tuple(vals))
    } else {
        Item::RawTuple(items)
    }
}

/// The unpickler stack. Each entry carries the serial of the object it holds, so that a
/// container memoised before its items were added (`EMPTY_DICT`, `BINPUT`, `SETITEMS`) is
/// refreshed in the memo when it is filled: a later `BINGET` then sees the filled object, as
/// Python's shared references would.
#[derive(Default)]
struct Stack {
    items: Vec<Item>,
    serials: Vec<u64>,
    next: u64,
}

impl Stack {
    fn push(&mut self, item: Item) {
        self.next += 1;
        self.push_with_serial(item, self.next);
    }

    fn push_with_serial(&mut self, item: Item, serial: u64) {
        self.items.push(item);
        self.serials.push(serial);
    }

    fn pop(&mut self) -> Option<Item> {
        self.serials.pop();
        self.items.pop()
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    fn split_off(&mut self, at: usize) -> Vec<Item> {
        self.serials.truncate(at);
        self.items.split_off(at)
    }

    fn last(&self) -> Option<(&Item, u64)> {
        Some((self.items.last()?, *self.serials.last()?))
    }

    fn last_mut(&mut self) -> Option<&mut Item> {
        self.items.last_mut()
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Stack,
    marks: Vec<usize>,
    /// Memo index → (object, serial).
    memo: HashMap<usize, (Item, u64)>,
    storage: &'a dyn Fn(&str) -> Option<&'a [u8]>,
}

fn storage_dtype(name: &str) -> Option<safetensors::Dtype> {
    use safetensors::Dtype;
    Some(match name {
        "FloatStorage" => Dtype::F32,
        "HalfStorage" => Dtype::F16,
        "BFloat16Storage" => Dtype::BF16,
        "DoubleStorage" => Dtype::F64,
        "LongStorage" => Dtype::I64,
        "IntStorage" => Dtype::I32,
        "ByteStorage" => Dtype::U8,
        "BoolStorage" => Dtype::BOOL,
        _ => return None,
    })
}

impl<'a> Unpickler<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let s = self
            .data
            .get(self.pos..self.pos + n)
            .ok_or("data.pkl ends in the middle of an opcode")?;
        self.pos += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32le(&mut self) -> Result<usize, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or("unterminated text line in pickle")?;
        self.pos += end + 1;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }

    fn pop(&mut self) -> Result<Item, String> {
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".into())
    }

    fn pop_mark(&mut self) -> Result<Vec<Item>, String> {
        let m = self.marks.pop().ok_or("pickle MARK missing")?;
        if m > self.stack.len() {
            return Err("pickle MARK beyond stack".into());
        }
        Ok(self.stack.split_off(m))
    }

    fn value(item: Item) -> Result<PyValue, String> {
        match item {
            Item::Value(v) => Ok(v),
            Item::Global(m, n) => Err(format!("unexpected bare global `{m}.{n}`")),
            Item::Storage { .. } => Err("unexpected bare storage".into()),
            Item::RawTuple(_) => Err("unexpected tuple of globals".into()),
        }
    }

    fn values(items: Vec<Item>) -> Result<Vec<PyValue>, String> {
        items.into_iter().map(Self::value).collect()
    }

    fn top_mut(&mut self) -> Result<&mut PyValue, String> {
        match self.stack.last_mut() {
            Some(Item::Value(v)) => Ok(v),
            _ => Err("pickle: expected a container on the stack".into()),
        }
    }

    fn push(&mut self, v: PyValue) {
        self.stack.push(Item::Value(v));
    }

    /// After the top object was filled in place: refresh its memo copies.
    fn refresh_memo(&mut self) {
        let Some((top, serial)) = self.stack.last() else {
            return;
        };
        if !self.memo.values().any(|(_, s)| *s == serial) {
            return;
        }
        let top = top.clone();
        for (item, s) in self.memo.values_mut() {
            if *s == serial {
                *item = top.clone();
            }
        }
    }

    fn long(bytes: &[u8]) -> Result<PyValue, String> {
        if bytes.len() > 8 {
            return Err("integer wider than 64 bits".into());
        }
        let neg = bytes.last().is_some_and(|b| b & 0x80 != 0);
        let mut a = if neg { [0xffu8; 8] } else { [0u8; 8] };
        a[..bytes.len()].copy_from_slice(bytes);
        Ok(PyValue::Int(i64::from_le_bytes(a)))
    }

    fn run(&mut self) -> Result<PyValue, String> {
        loop {
            let code = self.byte()?;
            match code {
                0x80 => {
                    self.byte()?;
                }
                0x95 => {
                    self.take(8)?;
                }
                b'.' => return Self::value(self.pop()?),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let (top, serial) = self.stack.last().ok_or("pickle stack underflow")?;
                    let top = top.clone();
                    self.stack.push_with_serial(top, serial);
                }
                b'N' => self.push(PyValue::None),
                0x88 => self.push(PyValue::Bool(true)),
                0x89 => self.push(PyValue::Bool(false)),
                b'I' => {
                    let l = self.line()?;
                    let v = match l.as_str() {
                        "01" => PyValue::Bool(true),
                        "00" => PyValue::Bool(false),
                        s => PyValue::Int(s.parse().map_err(|_| format!("bad INT `{s}`"))?),
                    };
                    self.push(v);
                }
                b'L' => {
                    let l = self.line()?;
                    let v = l
                        .trim_end_matches('L')
                        .parse()
                        .map_err(|_| format!("bad LONG `{l}`"))?;
                    self.push(PyValue::Int(v));
                }
                b'J' => {
                    let b = self.take(4)?;
                    self.push(PyValue::Int(
                        i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64
                    ));
                }
                b'K' => {
                    let b = self.byte()?;
                    self.push(PyValue::Int(b as i64));
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.push(PyValue::Int(u16::from_le_bytes([b[0], b[1]]) as i64));
                }
                0x8a => {
                    let n = self.byte()? as usize;
                    let b = self.take(n)?;
                    self.push(Self::long(b)?);
                }
                0x8b => {
                    let n = self.u32le()?;
                    let b = self.take(n)?;
                    self.push(Self::long(b)?);
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(PyValue::Float(f64::from_be_bytes(a)));
                }
                b'F' => {
                    let l = self.line()?;
                    self.push(PyValue::Float(
                        l.parse().map_err(|_| format!("bad FLOAT `{l}`"))?,
                    ));
                }
                b'X' | 0x8c | 0x8d | b'T' | b'U' => {
                    let n = match code {
                        b'X' | b'T' => self.u32le()?,
                        0x8c | b'U' => self.byte()? as usize,
                        _ => {
                            let b = self.take(8)?;
                            u64::from_le_bytes(b.try_into().map_err(|_| "short length")?) as usize
                        }
                    };
                    let b = self.take(n)?;
                    let s = if matches!(code, b'T' | b'U') {
                        b.iter().map(|&c| c as char).collect()
                    } else {
                        String::from_utf8(b.to_vec()).map_err(|_| "invalid UTF-8 in pickled str")?
                    };
                    self.push(PyValue::Str(s));
                }
                b'V' => {
                    let l = self.line()?;
                    self.push(PyValue::Str(l));
                }
                b'B' | b'C' | 0x8e => {
                    let n = match code {
                        b'B' => self.u32le()?,
                        b'C' => self.byte()? as usize,
                        _ => {
                            let b = self.take(8)?;
                            u64::from_le_bytes(b.try_into().map_err(|_| "short length")?) as usize
                        }
                    };
                    let b = self.take(n)?.to_vec();
                    self.push(PyValue::Bytes(b));
                }
                b']' => self.push(PyValue::List(Vec::new())),
                b'l' => {
                    let items = Self::values(self.pop_mark()?)?;
                    self.push(PyValue::List(items));
                }
                b'a' => {
                    let v = Self::value(self.pop()?)?;
                    match self.top_mut()? {
                        PyValue::List(l) => l.push(v),
                        _ => return Err("APPEND to a non-list".into()),
                    }
                    self.refresh_memo();
                }
                b'e' | 0x90 => {
                    let items = Self::values(self.pop_mark()?)?;
                    match self.top_mut()? {
                        PyValue::List(l) => l.extend(items),
                        _ => return Err("APPENDS to a non-list".into()),
                    }
                    self.refresh_memo();
                }
                0x8f => self.push(PyValue::List(Vec::new())),
                0x91 => {
                    let items = Self::values(self.pop_mark()?)?;
                    self.push(PyValue::List(items));
                }
                b')' => self.push(PyValue::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(make_tuple(items));
                }
                0x85..=0x87 => {
                    let n = (code - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("pickle stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(make_tuple(items));
                }
                b'}' => self.push(PyValue::Dict(Vec::new())),
                b'd' => {
                    let items = Self::values(self.pop_mark()?)?;
                    let pairs = pairs(items)?;
                    self.push(PyValue::Dict(pairs));
                }
                b's' => {
                    let v = Self::value(self.pop()?)?;
                    let k = Self::value(self.pop()?)?;
                    dict_insert(self.top_mut()?, vec![(k, v)])?;
                    self.refresh_memo();
                }
                b'u' => {
                    let items = Self::values(self.pop_mark()?)?;
                    let p = pairs(items)?;
                    dict_insert(self.top_mut()?, p)?;
                    self.refresh_memo();
                }
                b'c' => {
                    let m = self.line()?;
                    let n = self.line()?;
                    self.stack.push(Item::Global(m, n));
                }
                0x93 => {
                    let n = Self::value(self.pop()?)?;
                    let m = Self::value(self.pop()?)?;
                    match (m, n) {
                        (PyValue::Str(m), PyValue::Str(n)) => self.stack.push(Item::Global(m, n)),
                        _ => return Err("STACK_GLOBAL needs two strings".into()),
                    }
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let args = match args {
                        Item::Value(PyValue::Tuple(a)) => a.into_iter().map(Item::Value).collect(),
                        Item::RawTuple(a) => a,
                        _ => return Err("REDUCE arguments are not a tuple".into()),
                    };
                    let r = self.call(callable, args)?;
                    self.stack.push(r);
                }
                b'b' => {
                    // State of an object (e.g. a state dict's `_metadata`): not kept.
                    self.pop()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let r = self.persistent(pid)?;
                    self.stack.push(r);
                }
                b'P' => return Err("text persistent ids are not supported".into()),
                b'p' => {
                    let l = self.line()?;
                    let i = l.parse().map_err(|_| format!("bad PUT `{l}`"))?;
                    let (top, serial) = self.stack.last().ok_or("pickle stack underflow")?;
                    let entry = (top.clone(), serial);
                    self.memo.insert(i, entry);
                }
                b'q' | b'r' | 0x94 => {
                    let i = match code {
                        b'q' => self.byte()? as usize,
                        b'r' => self.u32le()?,
                        _ => self.memo.len(),
                    };
                    let (top, serial) = self.stack.last().ok_or("pickle stack underflow")?;
                    let entry = (top.clone(), serial);
                    self.memo.insert(i, entry);
                }
                b'g' | b'h' | b'j' => {
                    let i = match code {
                        b'g' => {
                            let l = self.line()?;
                            l.parse().map_err(|_| format!("bad GET `{l}`"))?
                        }
                        b'h' => self.byte()? as usize,
                        _ => self.u32le()?,
                    };
                    let (v, serial) = self
                        .memo
                        .get(&i)
                        .cloned()
                        .ok_or(format!("pickle memo {i} missing"))?;
                    self.stack.push_with_serial(v, serial);
                }
                other => return Err(format!("unsupported pickle opcode 0x{other:02x}")),
            }
        }
    }

    fn persistent(&mut self, pid: Item) -> Result<Item, String> {
        let Item::RawTuple(parts) = pid else {
            return Err("persistent id is not a storage reference".into());
        };
        match parts.as_slice() {
            [
                Item::Value(PyValue::Str(kind)),
                Item::Global(_, type_name),
                Item::Value(PyValue::Str(key)),
                _,
                Item::Value(PyValue::Int(numel)),
                ..,
            ] if kind == "storage" => {
                let dtype = storage_dtype(type_name)
                    .ok_or_else(|| format!("storage type `{type_name}` is not supported"))?;
                let data = (self.storage)(key)
                    .ok_or_else(|| format!("storage record `data/{key}` is missing"))?;
                let want = *numel as usize * (dtype.bitsize() / 8);
                if data.len() < want {
                    return Err(format!(
                        "storage `data/{key}` holds {} bytes, {want} expected",
                        data.len()
                    ));
                }
                Ok(Item::Storage {
                    dtype,
                    data: data[..want].to_vec(),
                })
            }
            _ => Err("persistent id is not a storage reference".into()),
        }
    }

    fn call(&mut self, callable: Item, args: Vec<Item>) -> Result<Item, String> {
        let Item::Global(module, name) = callable else {
            return Err("REDUCE on a non-global callable".into());
        };
        if module == "torch._utils" && (name == "_rebuild_tensor_v2" || name == "_rebuild_tensor") {
            return rebuild_tensor(args).map(|t| Item::Value(PyValue::Tensor(t)));
        }
        let args = Self::values(args)?;
        let v = match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") => {
                let items = match args.into_iter().next() {
                    Some(PyValue::List(l)) => l
                        .into_iter()
                        .map(|p| match p {
                            PyValue::Tuple(mut kv) if kv.len() == 2 => {
                                let v = kv.pop().unwrap_or(PyValue::None);
                                let k = kv.pop().unwrap_or(PyValue::None);
                                Ok((k, v))
                            }
                            _ => Err("OrderedDict item is not a pair".to_string()),
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                    _ => Vec::new(),
                };
                PyValue::OrderedDict(items)
            }
            ("builtins" | "__builtin__", "set" | "frozenset") => match args.into_iter().next() {
                Some(PyValue::List(l)) => PyValue::List(l),
                _ => PyValue::List(Vec::new()),
            },
            ("_codecs", "encode") => match args.first() {
                Some(PyValue::Str(s)) => {
                    PyValue::Bytes(s.chars().map(|c| c as u32 as u8).collect())
                }
                _ => return Err("_codecs.encode needs a str".into()),
            },
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                match args.into_iter().next() {
                    Some(t @ PyValue::Tensor(_)) => t,
                    _ => return Err("_rebuild_parameter needs a tensor".into()),
                }
            }
            (m, n) => {
                return Err(format!(
                    "pickle calls `{m}.{n}`, which a weights-only load does not allow"
                ));
            }
        };
        Ok(Item::Value(v))
    }
}

fn dims(v: &Item, what: &str) -> Result<Vec<usize>, String> {
    match v {
        Item::Value(PyValue::Tuple(d) | PyValue::List(d)) => d
            .iter()
            .map(|x| match x {
                PyValue::Int(i) if *i >= 0 => Ok(*i as usize),
                _ => Err(format!("tensor {what} holds a non-integer")),
            })
            .collect(),
        _ => Err(format!("tensor {what} is not a tuple")),
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, ...)` → a contiguous f32 tensor.
fn rebuild_tensor(args: Vec<Item>) -> Result<HostTensor, String> {
    let [
        Item::Storage { dtype, data },
        Item::Value(PyValue::Int(offset)),
        size,
        stride,
        ..,
    ] = args.as_slice()
    else {
        return Err("_rebuild_tensor_v2: unexpected arguments".into());
    };
    let values = super::decode_floats(*dtype, data)
        .ok_or_else(|| format!("storage dtype {dtype:?} is not supported"))?;
    let shape = dims(size, "size")?;
    let stride = dims(stride, "stride")?;
    if shape.len() != stride.len() {
        return Err("tensor size and stride differ in length".into());
    }
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("tensor size overflows")?;
    // A stride-0 (expanded) tensor may claim far more elements than its storage holds: fail
    // cleanly rather than abort when that cannot be allocated.
    let mut out = Vec::new();
    out.try_reserve_exact(n)
        .map_err(|_| format!("tensor of shape {shape:?} is too large to load"))?;
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..n {
        let at = *offset as usize + idx.iter().zip(&stride).map(|(i, s)| i * s).sum::<usize>();
        out.push(*values.get(at).ok_or("tensor reaches past its storage")?);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(HostTensor { shape, data: out })
}

fn pairs(items: Vec<PyValue>) -> Result<Vec<(PyValue, PyValue)>, String> {
    if !items.len().is_multiple_of(2) {
        return Err("odd number of dict items".into());
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn dict_insert(target: &mut PyValue, items: Vec<(PyValue, PyValue)>) -> Result<(), String> {
    let (PyValue::Dict(d) | PyValue::OrderedDict(d)) = target else {
        return Err("SETITEM(S) on a non-dict".into());
    };
    for (k, v) in items {
        if let Some(slot) = d.iter_mut().find(|(ek, _)| *ek == k) {
            slot.1 = v;
        } else {
            d.push((k, v));
        }
    }
    Ok(())
}
