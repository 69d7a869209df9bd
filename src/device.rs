//! Which compute device a model stage runs on.

use crate::pipeline::{Device, Precision};

/// Whether this binary can run on a CUDA GPU.
pub fn cuda_available() -> bool {
    cfg!(feature = "cuda")
}

/// The device a stage with `device` really uses, as recorded in keys and records
/// (`"cpu"` or `"cuda:N"`).
pub fn resolve(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Auto if !cuda_available() => "cpu".into(),
        Device::Auto => "cuda:0".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
    }
}

/// The key fragment of a model stage: the numbers depend on where and in what precision they
/// are computed.
pub fn key_fragment(device: Device, precision: Precision) -> serde_json::Value {
    let kind = if resolve(device) == "cpu" {
        "cpu"
    } else {
        "cuda"
    };
    serde_json::json!({ "device": kind, "precision": precision })
}
