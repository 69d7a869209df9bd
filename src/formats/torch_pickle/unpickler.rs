//! The unpickler: runs `data.pkl` over the archive's storages and rebuilds tensors.

use std::collections::HashMap;

use super::PyValue;
use crate::formats::HostTensor;

/// Runs the pickle program `data`, resolving persistent storage ids through `storage` (a
/// storage key → its bytes in the archive).
pub(super) fn unpickle<'a>(
    data: &'a [u8],
    storage: &'a dyn Fn(&str) -> Option<&'a [u8]>,
) -> Result<PyValue, String> {
    Unpickler {
        data,
        pos: 0,
        stack: Stack::default(),
        marks: Vec::new(),
        memo: HashMap::new(),
        storage,
    }
    .run()
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
    let values = crate::formats::decode_floats(*dtype, data)
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
