//! Stage keys: a Merkle chain over everything that can change a stage's result.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::hash::hash_bytes;

/// Version of the key layout itself; bumping it invalidates every key.
pub const KEY_SCHEMA: u32 = 1;

/// What a stage key hashes. Kept in records and run locks so `plan` can say what changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyMaterial {
    /// [`KEY_SCHEMA`].
    pub schema: u32,
    /// Stage kind (`caption`, `preprocess`, ...).
    pub kind: String,
    /// The kind's implementation version, bumped by hand when its numerics change.
    pub version: u32,
    /// Parsed, defaulted, normalised parameters (no file paths: inputs are hashed instead).
    pub params: Value,
    /// External inputs: name (relative path) → blake3.
    pub inputs: BTreeMap<String, String>,
    /// Upstream instance name → output digest of its record.
    pub upstream: BTreeMap<String, String>,
}

impl KeyMaterial {
    /// The stage key: blake3 of the canonical JSON of the material.
    pub fn key(&self) -> String {
        let value = serde_json::to_value(self).unwrap_or(Value::Null);
        hash_bytes(canonical_json(&value).as_bytes())
    }
}

/// JSON with object keys sorted at every level, whatever map type serde_json was built with.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn material(params: Value) -> KeyMaterial {
        KeyMaterial {
            schema: KEY_SCHEMA,
            kind: "caption".into(),
            version: 1,
            params,
            inputs: BTreeMap::new(),
            upstream: BTreeMap::new(),
        }
    }

    #[test]
    fn key_ignores_object_key_order() {
        let a = material(json!({"a": 1, "b": {"x": 1, "y": 2}}));
        let b = material(json!({"b": {"y": 2, "x": 1}, "a": 1}));
        assert_eq!(a.key(), b.key());
    }

    #[test]
    fn key_changes_with_each_part() {
        let base = material(json!({"a": 1}));
        let mut v = base.clone();
        v.version = 2;
        assert_ne!(base.key(), v.key());
        let mut p = base.clone();
        p.params = json!({"a": 2});
        assert_ne!(base.key(), p.key());
        let mut i = base.clone();
        i.inputs.insert("x.png".into(), "00".into());
        assert_ne!(base.key(), i.key());
        let mut u = base.clone();
        u.upstream.insert("caption".into(), "00".into());
        assert_ne!(base.key(), u.key());
    }
}
