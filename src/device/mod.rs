//! Which compute device a model stage runs on.
//!
//! `device = "auto" | "cpu" | "cuda:N"` (pipeline files, `--device` on commands) is turned into a
//! [`Runtime`] once at the top of a stage or command with [`open`]; the model code below it is
//! generic over `D: dfdx::tensor_ops::Device<f32>`, and [`on_device!`](crate::on_device) calls it
//! with the concrete device:
//!
//! ```ignore
//! let rt = sdpipe::device::open(settings.device)?;
//! sdpipe::on_device!(rt, dev => run_on(ctx, dev))
//! ```
//!
//! `auto` is the GPU (CUDA device 0) only when this binary was built with the `cuda` feature *and*
//! a GPU can be opened at run time; otherwise the CPU (said once on stderr when a CUDA build finds
//! no GPU).

mod choice;

pub use choice::{DeviceChoice, Precision};

/// Whether this binary can run on a CUDA GPU (built with `--features cuda`).
pub fn cuda_available() -> bool {
    cfg!(feature = "cuda")
}

/// Whether this binary has CUDA and CUDA device 0 can be opened (probed once per process).
pub fn gpu_present() -> bool {
    #[cfg(feature = "cuda")]
    {
        static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *PRESENT.get_or_init(|| match open_cuda(0) {
            Ok(_) => true,
            Err(e) => {
                eprintln!("note: device \"auto\": no usable CUDA GPU ({e}); running on the CPU");
                false
            }
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

static OVERRIDE: std::sync::OnceLock<DeviceChoice> = std::sync::OnceLock::new();

/// Makes every later [`resolve`], [`key_fragment`] and [`open`] of this process use `device`
/// instead of the pipeline's `device` (the `--device` option of `run`, `watch` and `plan`).
/// The first call wins.
pub fn set_override(device: DeviceChoice) {
    let _ = OVERRIDE.set(device);
}

fn effective(device: DeviceChoice) -> DeviceChoice {
    OVERRIDE.get().copied().unwrap_or(device)
}

/// Checks that this binary can use `device` at all (`cuda:N` needs the `cuda` feature).
pub fn check_supported(device: DeviceChoice) -> Result<(), DeviceError> {
    match device {
        DeviceChoice::Cuda(n) if !cuda_available() => Err(DeviceError::NoCudaSupport(n)),
        _ => Ok(()),
    }
}

/// The device a stage with `device` really uses, as recorded in keys and records
/// (`"cpu"` or `"cuda:N"`), after the [`set_override`]. `auto` resolves to `"cuda:0"` only when [`gpu_present`].
pub fn resolve(device: DeviceChoice) -> String {
    match effective(device) {
        DeviceChoice::Cpu => "cpu".into(),
        DeviceChoice::Auto if !gpu_present() => "cpu".into(),
        DeviceChoice::Auto => "cuda:0".into(),
        DeviceChoice::Cuda(n) => format!("cuda:{n}"),
    }
}

/// The key fragment of a model stage: the numbers depend on where and in what precision they
/// are computed.
pub fn key_fragment(device: DeviceChoice, precision: Precision) -> serde_json::Value {
    let kind = if resolve(device) == "cpu" {
        "cpu"
    } else {
        "cuda"
    };
    serde_json::json!({ "device": kind, "precision": precision })
}

/// An opened compute device: what [`on_device!`](crate::on_device) dispatches on.
#[derive(Clone)]
pub enum Runtime {
    /// dfdx's CPU device.
    Cpu(dfdx::tensor::Cpu),
    /// dfdx's CUDA device, built for device `ordinal`.
    #[cfg(feature = "cuda")]
    Cuda {
        /// The device.
        dev: dfdx::tensor::Cuda,
        /// Its CUDA ordinal.
        ordinal: usize,
    },
}

impl Runtime {
    /// `"cpu"` or `"cuda:N"`.
    pub fn name(&self) -> String {
        match self {
            Runtime::Cpu(_) => "cpu".into(),
            #[cfg(feature = "cuda")]
            Runtime::Cuda { ordinal, .. } => format!("cuda:{ordinal}"),
        }
    }
}

/// Why a device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// `cuda:N` asked of a binary built without the `cuda` feature.
    #[error(
        "device \"cuda:{0}\" is not available: this binary was built without CUDA (build with --features cuda, see README \"GPU build\")"
    )]
    NoCudaSupport(usize),
    /// The CUDA driver could not open the device.
    #[error("cannot open CUDA device {ordinal}: {message}")]
    Cuda {
        /// The device ordinal asked for.
        ordinal: usize,
        /// The driver's error.
        message: String,
    },
}

/// Opens `device` (or the [`set_override`]; dfdx devices are seeded with 0; the stages draw their own noise).
pub fn open(device: DeviceChoice) -> Result<Runtime, DeviceError> {
    match effective(device) {
        DeviceChoice::Cpu => Ok(Runtime::Cpu(dfdx::tensor::Cpu::default())),
        DeviceChoice::Auto if !gpu_present() => Ok(Runtime::Cpu(dfdx::tensor::Cpu::default())),
        DeviceChoice::Auto => open_cuda(0),
        DeviceChoice::Cuda(n) => open_cuda(n),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Runtime, DeviceError> {
    use cudarc::driver::result;
    let err = |message: String| DeviceError::Cuda { ordinal, message };
    // dfdx's `try_build` unwraps these two driver calls: ask first so a missing driver or device
    // is an error, not a panic.
    result::init().map_err(|e| err(format!("the CUDA driver does not start: {e:?}")))?;
    let count = result::device::get_count().map_err(|e| err(format!("{e:?}")))?;
    if ordinal >= count.max(0) as usize {
        return Err(err(format!("this machine has {count} CUDA device(s)")));
    }
    let dev = dfdx::tensor::Cuda::try_build(ordinal, 0).map_err(|e| DeviceError::Cuda {
        ordinal,
        message: e.to_string(),
    })?;
    // Keep freed buffers for reuse (dfdx's cache is off by default): every cuMemFree
    // synchronises the device, and a training step frees thousands of activations. The pool's
    // size is then the high-water mark the memory probe reads (`memory::device_peak_bytes`).
    use dfdx::tensor::Cache as _;
    dev.try_enable_cache().map_err(|e| DeviceError::Cuda {
        ordinal,
        message: format!("enabling the allocation cache: {e:?}"),
    })?;
    Ok(Runtime::Cuda { dev, ordinal })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Runtime, DeviceError> {
    Err(DeviceError::NoCudaSupport(ordinal))
}

/// Runs `$body` with `$dev` bound to the concrete dfdx device of the [`Runtime`] `$rt`
/// (`dfdx::tensor::Cpu` or, in a CUDA build, `dfdx::tensor::Cuda`); `$body` is compiled once
/// per device type, so it can call code generic over `D: Device<f32>`.
#[macro_export]
macro_rules! on_device {
    ($rt:expr, $dev:ident => $body:expr) => {
        match $rt {
            $crate::device::Runtime::Cpu($dev) => $body,
            #[cfg(feature = "cuda")]
            $crate::device::Runtime::Cuda { dev: $dev, .. } => $body,
        }
    };
}

/// [`on_device!`] that also names the UNet's element type for `precision`: `$E` is `f32`, or
/// [`crate::diffusion::nn::Half`] for `"f16"` (mixed precision), inside `$body`.
#[macro_export]
macro_rules! on_device_precision {
    ($rt:expr, $precision:expr, $dev:ident, $E:ident => $body:expr) => {
        match $precision {
            $crate::device::Precision::F16 => {
                type $E = $crate::diffusion::nn::Half;
                $crate::on_device!($rt, $dev => $body)
            }
            _ => {
                type $E = f32;
                $crate::on_device!($rt, $dev => $body)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_resolves_and_opens_everywhere() {
        assert_eq!(resolve(DeviceChoice::Cpu), "cpu");
        let rt = open(DeviceChoice::Cpu).unwrap();
        assert_eq!(rt.name(), "cpu");
        let n = on_device!(rt, dev => {
            use dfdx::prelude::*;
            let t: Tensor<(usize,), f32, _> = dev.tensor_from_vec(vec![1.0, 2.0], (2,));
            t.as_vec().len()
        });
        assert_eq!(n, 2);
    }

    #[test]
    fn auto_is_cpu_without_a_gpu() {
        if !gpu_present() {
            assert_eq!(resolve(DeviceChoice::Auto), "cpu");
            assert!(matches!(open(DeviceChoice::Auto), Ok(Runtime::Cpu(_))));
            assert_eq!(
                key_fragment(DeviceChoice::Auto, Precision::F32),
                key_fragment(DeviceChoice::Cpu, Precision::F32)
            );
        }
    }

    #[test]
    fn cuda_without_cuda_support_is_an_error() {
        if !cuda_available() {
            let e = open(DeviceChoice::Cuda(1)).err().unwrap();
            assert!(e.to_string().contains("cuda:1"), "{e}");
        }
    }
}
