//! `[pipeline]`: settings shared by every stage.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The `[pipeline]` table, defaulted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Name of the pipeline; outputs go to `outputs/<name>/`. Defaults to the file stem.
    #[serde(default)]
    pub name: String,
    /// Seed every stage derives its randomness from.
    #[serde(default)]
    pub seed: u64,
    /// Base checkpoint (single-file `.safetensors` or diffusers folder), relative to the file.
    #[serde(default)]
    pub base_model: Option<PathBuf>,
    /// A diffusers-style folder whose `unet/`, `vae/`, `text_encoder/` `config.json` files
    /// describe the architecture of a single-file `base_model` (only needed for models whose
    /// shape cannot be inferred from the tensors, like the tiny test models). Relative to the file.
    #[serde(default)]
    pub model_config: Option<PathBuf>,
    /// Where model stages run.
    #[serde(default)]
    pub device: Device,
    /// Float type of model stages.
    #[serde(default)]
    pub precision: Precision,
}

/// `device = "auto" | "cpu" | "cuda:N"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Device {
    /// The GPU when the binary has CUDA and one is present, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl TryFrom<String> for Device {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    format!("unknown device `{s}`: use \"auto\", \"cpu\" or \"cuda:N\" (e.g. \"cuda:0\")")
                }),
        }
    }
}

impl From<Device> for String {
    fn from(d: Device) -> String {
        d.to_string()
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// `precision = "f32" | "f16" | "bf16"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats (the only precision on the CPU).
    #[default]
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}
