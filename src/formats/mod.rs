//! Files that other Stable Diffusion tools write and read: LoRA networks (kohya, diffusers,
//! PEFT), textual-inversion embeddings (A1111/kohya, diffusers), A1111 hypernetworks, and the
//! torch checkpoint archive (`torch.save`) that the A1111 `.pt` files use.
//!
//! Everything here works on host-side [`HostTensor`]s (row-major f32 with a shape); model code
//! turns them into device tensors.

pub mod checkpoint;
pub mod embedding;
pub mod hypernetwork;
pub mod lora;
pub mod torch_pickle;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub use crate::diffusion::host_tensor::HostTensor;
use safetensors::{Dtype, SafeTensors};

/// Errors of the file-format readers and writers; each names the file and, where it applies,
/// the tensor key.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid safetensors file.
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What safetensors reported.
        message: String,
    },
    /// A tensor has a dtype this crate does not convert to f32.
    #[error(
        "{path}: tensor `{key}` has dtype {dtype}, expected F32, F16, BF16, F64, I64, I32, U8 or BOOL"
    )]
    Dtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        key: String,
        /// Its dtype.
        dtype: String,
    },
    /// The content does not fit the format (a key, a shape, a metadata value).
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
}

impl FormatError {
    pub(crate) fn invalid(path: &Path, message: impl Into<String>) -> Self {
        FormatError::Invalid {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        FormatError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Result type of this module.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;

/// The tensors (converted to f32) and the metadata of a safetensors file.
#[derive(Debug, Clone, Default)]
pub struct SafetensorsFile {
    /// Tensors by key, sorted.
    pub tensors: BTreeMap<String, HostTensor>,
    /// The `__metadata__` map (empty when absent).
    pub metadata: HashMap<String, String>,
}

/// Reads a whole safetensors file, converting every tensor to f32 (integers by value).
pub fn read_safetensors(path: &Path) -> Result<SafetensorsFile> {
    let bytes = std::fs::read(path).map_err(|e| FormatError::io(path, e))?;
    parse_safetensors(path, &bytes)
}

/// Parses safetensors bytes (`path` only names the source in errors).
pub fn parse_safetensors(path: &Path, bytes: &[u8]) -> Result<SafetensorsFile> {
    let st_err = |e: safetensors::SafeTensorError| FormatError::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(st_err)?;
    let st = SafeTensors::deserialize(bytes).map_err(st_err)?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.iter() {
        let data = decode_floats(view.dtype(), view.data()).ok_or_else(|| FormatError::Dtype {
            path: path.to_path_buf(),
            key: name.to_string(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        tensors.insert(
            name.to_string(),
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(SafetensorsFile {
        tensors,
        metadata: meta.metadata().clone().unwrap_or_default(),
    })
}

/// Little-endian bytes of `dtype` to f32 (floats, and I64/I32/U8/BOOL as their values;
/// `None` for other dtypes).
pub(crate) fn decode_floats(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                f64::from_le_bytes(a) as f32
            })
            .collect(),
        Dtype::I64 => bytes
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                i64::from_le_bytes(a) as f32
            })
            .collect(),
        Dtype::I32 => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
            .collect(),
        Dtype::U8 | Dtype::BOOL => bytes.iter().map(|&b| b as f32).collect(),
        _ => return None,
    })
}

/// Serializes f32 tensors (and optional metadata) to safetensors bytes.
pub fn safetensors_bytes(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.to_le_bytes(), t.shape.clone()))
        .collect();
    let mut views = Vec::with_capacity(bytes.len());
    for (k, b, shape) in &bytes {
        let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b)
            .map_err(|e| FormatError::invalid(path, format!("tensor `{k}`: {e}")))?;
        views.push((k.as_str(), view));
    }
    let bytes =
        safetensors::tensor::serialize(views, metadata).map_err(|e| FormatError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    Ok(canonical_header(bytes))
}

/// The same safetensors file with its JSON header's keys sorted (the `safetensors` crate writes
/// the metadata map in hash order): equal content gives equal bytes, which content-addressed
/// caching and reproducible artifacts rely on.
pub fn canonical_header(bytes: Vec<u8>) -> Vec<u8> {
    let Some(len) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
    else {
        return bytes;
    };
    let Some(header) = bytes
        .get(8..8 + len)
        .and_then(|h| serde_json::from_slice::<serde_json::Value>(h).ok())
    else {
        return bytes;
    };
    let mut text = crate::cache::canonical_json(&header).into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + len..]);
    out
}

/// Writes f32 tensors (and optional metadata) as a safetensors file, atomically (a temporary
/// file in the same directory, then a rename).
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes = safetensors_bytes(path, tensors, metadata)?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary sibling file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| FormatError::io(path, e))?;
    tmp.write_all(bytes).map_err(|e| FormatError::io(path, e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| FormatError::io(path, e))?;
    tmp.persist(path)
        .map_err(|e| FormatError::io(path, e.error))?;
    Ok(())
}

/// Uniform samples in [-bound, bound) and N(0, std²) samples from one seeded stream.
pub(crate) struct InitRng {
    normal: crate::diffusion::schedulers::SeededNoise,
    uniform: rand_chacha::ChaCha8Rng,
}

impl InitRng {
    pub(crate) fn new(seed: u64) -> Self {
        use rand_chacha::rand_core::SeedableRng;
        Self {
            normal: crate::diffusion::schedulers::SeededNoise::new(seed),
            uniform: rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15),
        }
    }

    pub(crate) fn normal(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| (self.normal.next_normal() * std) as f32)
            .collect()
    }

    pub(crate) fn uniform(&mut self, n: usize, bound: f64) -> Vec<f32> {
        use rand_chacha::rand_core::Rng;
        (0..n)
            .map(|_| {
                let u = (self.uniform.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                ((2.0 * u - 1.0) * bound) as f32
            })
            .collect()
    }
}
