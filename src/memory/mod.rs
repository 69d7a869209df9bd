//! Memory on the compute device: what a task used at its peak (measured, for `sdpipe bench`),
//! what is available (for the refusal before a run), and what a train stage will need
//! ([`estimate`], printed by `plan`).
//!
//! On the CPU, "device memory" is the process's resident memory: the peak is read from
//! `/proc/self/status` (`VmHWM`, reset through `/proc/self/clear_refs` at the start of a
//! measurement where the kernel allows it) and what is available from `/proc/meminfo`
//! (`MemAvailable`). On a GPU both come from the driver ([`device_peak_bytes`]: the memory in
//! use, i.e. dfdx's cached pool; [`device_total_bytes`]); a binary without CUDA has neither
//! (the callers then say the figure is unknown rather than guessing).

pub mod estimate;
pub mod stages;

pub use estimate::{
    LoadedModels, MemoryEstimate, TrainShape, TrainedPart, estimate_pretrain, estimate_train,
};

/// Environment variable that replaces the memory available on the device, in bytes or with a
/// unit (`512MiB`, `24GiB`, `2G`). For tests of the refusal, and for a user who shares the
/// device and wants to leave room for something else.
pub const MEMORY_LIMIT_ENV: &str = "SDPIPE_MEMORY_LIMIT";

/// A field of `/proc/self/status` or `/proc/meminfo` (`VmHWM:  1234 kB`), in bytes.
fn proc_field(file: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| {
        l.strip_prefix(field)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    let mut parts = line.split_whitespace().skip(1);
    let value: u64 = parts.next()?.parse().ok()?;
    let unit = parts.next().unwrap_or("B");
    Some(match unit {
        "kB" | "KB" | "kiB" => value * 1024,
        "mB" | "MB" => value * 1024 * 1024,
        _ => value,
    })
}

/// Resident memory of this process now (`VmRSS`), bytes.
pub fn current_rss() -> Option<u64> {
    proc_field("/proc/self/status", "VmRSS")
}

/// Peak resident memory of this process (`VmHWM`), bytes.
pub fn peak_rss() -> Option<u64> {
    proc_field("/proc/self/status", "VmHWM")
}

/// Resets the peak resident memory (`VmHWM`) to the current resident memory (Linux ≥ 4.0:
/// writing `5` to `/proc/self/clear_refs`). Returns whether it worked.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Device memory in use on `device` (`"cuda:N"`), bytes: total minus free of the current CUDA
/// context (`cuMemGetInfo`). The CUDA runtime keeps freed buffers in dfdx's allocation cache
/// (see `device::open`), so after a run this is the high-water mark of its pool; the probe
/// subtracts what was in use when it started. `None` without CUDA or a current context.
pub fn device_peak_bytes(device: &str) -> Option<u64> {
    let _ = device;
    #[cfg(feature = "cuda")]
    {
        cudarc::driver::result::mem_get_info()
            .ok()
            .map(|(free, total)| total.saturating_sub(free) as u64)
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}

/// Total memory of `device` (`"cuda:N"`), bytes, from the driver (`cuDeviceTotalMem`); `None`
/// without CUDA, a driver or that device.
pub fn device_total_bytes(device: &str) -> Option<u64> {
    #[cfg(feature = "cuda")]
    {
        use cudarc::driver::result;
        let ordinal: i32 = device.strip_prefix("cuda:")?.parse().ok()?;
        result::init().ok()?;
        let dev = result::device::get(ordinal).ok()?;
        // SAFETY: `dev` is a valid device handle from the initialised driver.
        unsafe { result::device::total_mem(dev) }
            .ok()
            .map(|b| b as u64)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        None
    }
}

/// Measures the peak memory of one piece of work on one device.
#[derive(Debug, Clone)]
pub struct MemoryProbe {
    device: String,
    baseline: u64,
    reset: bool,
}

/// A measured peak.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MeasuredPeak {
    /// Bytes above the memory in use when the probe started (so the model weights count
    /// when the probe starts before they are loaded).
    pub bytes: u64,
    /// How it was measured, in words (e.g. `peak RSS growth (VmHWM − VmRSS at start)`).
    pub source: String,
}

impl MemoryProbe {
    /// Starts measuring on `device` (`"cpu"` or `"cuda:N"`): on the CPU, resets the process's
    /// peak RSS and remembers the RSS now.
    pub fn start(device: &str) -> Self {
        let reset = device == "cpu" && reset_peak_rss();
        let baseline = if device == "cpu" {
            current_rss().unwrap_or(0)
        } else {
            device_peak_bytes(device).unwrap_or(0)
        };
        Self {
            device: device.to_string(),
            baseline,
            reset,
        }
    }

    /// The peak since [`MemoryProbe::start`], or `None` where it cannot be measured.
    pub fn peak(&self) -> Option<MeasuredPeak> {
        if self.device == "cpu" {
            let hwm = peak_rss()?;
            let source = if self.reset {
                "cpu: peak RSS growth (VmHWM, reset at start, minus VmRSS at start)"
            } else {
                "cpu: peak RSS growth (VmHWM minus VmRSS at start; VmHWM could not be reset, \
                 so an earlier peak may show)"
            };
            Some(MeasuredPeak {
                bytes: hwm.saturating_sub(self.baseline),
                source: source.into(),
            })
        } else {
            device_peak_bytes(&self.device).map(|used| MeasuredPeak {
                bytes: used.saturating_sub(self.baseline),
                source: format!(
                    "{}: device memory in use after the run minus at the start (cuMemGetInfo; \
                     freed buffers stay in dfdx's cache, so this is its pool's high-water mark)",
                    self.device
                ),
            })
        }
    }
}

/// What the device has for a run, and where the figure comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Available {
    /// Bytes.
    pub bytes: u64,
    /// `SDPIPE_MEMORY_LIMIT`, `MemAvailable (/proc/meminfo)`, `total memory of cuda:0`.
    pub source: String,
}

/// Parses a byte count: a plain number of bytes, or a number with `K`/`M`/`G`/`T` (powers of
/// 1024, with or without `iB`/`B`).
pub fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().ok()?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return None,
    };
    (value.is_finite() && value >= 0.0).then_some((value * scale as f64) as u64)
}

/// The memory available on `device` (`"cpu"` or `"cuda:N"`): [`MEMORY_LIMIT_ENV`] when set,
/// else `MemAvailable` on the CPU and the device total on a GPU. `Err` says why it is unknown
/// (a malformed variable, no `/proc/meminfo`, no GPU probe in this binary).
pub fn available(device: &str) -> Result<Available, String> {
    if let Ok(v) = std::env::var(MEMORY_LIMIT_ENV) {
        return parse_bytes(&v)
            .map(|bytes| Available {
                bytes,
                source: MEMORY_LIMIT_ENV.into(),
            })
            .ok_or_else(|| {
                format!("{MEMORY_LIMIT_ENV}={v:?} is not a byte count (e.g. 8GiB or 8589934592)")
            });
    }
    if device == "cpu" {
        proc_field("/proc/meminfo", "MemAvailable")
            .map(|bytes| Available {
                bytes,
                source: "MemAvailable (/proc/meminfo)".into(),
            })
            .ok_or_else(|| "MemAvailable is not in /proc/meminfo".into())
    } else {
        device_total_bytes(device)
            .map(|bytes| Available {
                bytes,
                source: format!("total memory of {device}"),
            })
            .ok_or_else(|| format!("this binary cannot query the memory of {device}"))
    }
}

/// `n` bytes for people: `1.5 GiB`, `320.0 MiB`, `12 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_parse() {
        assert_eq!(parse_bytes("1024"), Some(1024));
        assert_eq!(parse_bytes("2KiB"), Some(2048));
        assert_eq!(parse_bytes("1.5 GiB"), Some(3 << 29));
        assert_eq!(parse_bytes("3g"), Some(3 << 30));
        assert_eq!(parse_bytes("12 parsecs"), None);
        assert_eq!(parse_bytes(""), None);
    }
}
