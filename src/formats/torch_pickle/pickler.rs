//! The protocol-2 pickler: a [`PyValue`] as `data.pkl`, tensors as persistent storages.

use super::PyValue;
use super::opcodes as op;
use crate::formats::HostTensor;

/// Pickles `value` with protocol 2: the `data.pkl` bytes and the storages its tensors refer to
/// (written as `data/<index>`).
pub(super) fn pickle(value: &PyValue) -> Result<(Vec<u8>, Vec<Vec<u8>>), String> {
    let mut p = Pickler {
        out: vec![op::PROTO, 2],
        storages: Vec::new(),
    };
    p.value(value)?;
    p.out.push(op::STOP);
    Ok((p.out, p.storages))
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
