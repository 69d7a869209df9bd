//! Writing a [`LoraNetwork`] in the kohya layout (`lora_unet_…`, `lora_te_…`) with its `ss_*`
//! training metadata.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::{LoraComponent, LoraNetwork, ModuleKind};
use crate::formats::{HostTensor, Result, write_safetensors};

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
        let kinds = net.kinds();
        let lycoris = kinds.iter().any(|k| *k != ModuleKind::Lora);
        let module = if lycoris {
            "lycoris.kohya"
        } else {
            "networks.lora"
        };
        m.insert("ss_network_module".into(), module.into());
        if lycoris {
            // LyCORIS' own record of the algorithm: `algo`, and `dora_wd` for DoRA
            let algo = if kinds.contains(&ModuleKind::Hada) {
                "loha"
            } else if kinds.contains(&ModuleKind::Kron) {
                "lokr"
            } else {
                "locon"
            };
            let mut args = serde_json::json!({ "algo": algo });
            if kinds.contains(&ModuleKind::Dora) {
                args["dora_wd"] = "True".into();
            }
            m.insert("ss_network_args".into(), args.to_string());
        } else if let Some((_, _, conv)) = net.iter().find(|(_, _, m)| m.is_conv()) {
            // kohya's record of a LoCon: the convolutions' rank and alpha
            let args = serde_json::json!({
                "conv_dim": conv.rank().to_string(),
                "conv_alpha": py_float(conv.alpha() as f64),
            });
            m.insert("ss_network_args".into(), args.to_string());
        }
        m.insert("ss_base_model_version".into(), "sd_v1".into());
        m.insert("ss_v2".into(), "False".into());
        if let Some((_, _, first)) = net.iter().next() {
            m.insert("ss_network_dim".into(), first.rank().to_string());
            m.insert("ss_network_alpha".into(), py_float(first.alpha() as f64));
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

/// The kohya/LyCORIS tensors of `net` (see [`NetworkModule::file_tensors`](super::NetworkModule::file_tensors)).
pub fn kohya_tensors(net: &LoraNetwork) -> BTreeMap<String, HostTensor> {
    let mut t = BTreeMap::new();
    for (component, module, m) in net.iter() {
        let name = kohya_name(component, module);
        for (suffix, tensor) in m.file_tensors() {
            t.insert(format!("{name}.{suffix}"), tensor);
        }
    }
    t
}

/// Writes `net` as a kohya sd-scripts LoRA safetensors file (atomically) with `ss_*` metadata.
pub fn write_kohya(path: &Path, net: &LoraNetwork, meta: &KohyaMetadata) -> Result<()> {
    write_safetensors(path, &kohya_tensors(net), Some(meta.to_map(net)))
}
