//! Assembling the key material of a stage instance.

use std::collections::BTreeMap;

use crate::cache::{FileHasher, KEY_SCHEMA, KeyMaterial};
use crate::pipeline::{Pipeline, StageInstance};

/// The key material of `instance`: kind, version, normalised params, hashed external inputs
/// and the output digests of its upstream instances (`upstream`: name → digest).
pub fn stage_material(
    pipeline: &Pipeline,
    instance: &StageInstance,
    hasher: &FileHasher,
    upstream: BTreeMap<String, String>,
) -> anyhow::Result<KeyMaterial> {
    Ok(KeyMaterial {
        schema: KEY_SCHEMA,
        kind: instance.params.kind().to_string(),
        version: instance.params.version(),
        params: instance.params.key_params(&pipeline.settings),
        inputs: instance.params.inputs(&pipeline.settings, hasher)?,
        upstream,
    })
}
