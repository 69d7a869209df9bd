//! Weight loading: memory-mapped safetensors files (F32, F16, BF16 converted to f32) seen through
//! diffusers tensor names, whichever layout they come from.
//!
//! * [`SafetensorsFile`]: one memory-mapped file, its header parsed and validated (a truncated
//!   file is an error here, before any tensor is read).
//! * [`WeightStore`]: the tensors of one model component (UNet, VAE or text encoder) under their
//!   diffusers names, each pointing into a file (under its own name there, possibly a 1x1-conv
//!   shape for a linear weight).
//! * [`Loader`]: builds dfdx tensors from a store with a name prefix, checking shapes.
//!
//! Whole models are loaded one level up, in [`crate::diffusion::checkpoint`] (either layout,
//! configs included; the LDM/CompVis names in its `single_file`).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dfdx::prelude::*;
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, Metadata, SafeTensors};

use super::elem::{Elem, elems};
use super::{Tensor1, Tensor2, Tensor4};
use crate::diffusion::error::{DiffusionError, Result};

/// A memory-mapped safetensors file with its parsed header.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    metadata: Metadata,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.metadata.tensors().len())
            .finish()
    }
}

impl SafetensorsFile {
    /// Memory-maps `path` and validates its header against the file size.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| DiffusionError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the map is read-only; like every safetensors reader we assume the file is not
        // truncated or rewritten by another process while it is mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| DiffusionError::Io {
            path: path.clone(),
            source,
        })?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| DiffusionError::CorruptFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            path,
            mmap,
            data_start: 8 + header_len,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The names of all tensors in the file.
    pub fn names(&self) -> Vec<String> {
        self.metadata.tensors().into_keys().collect()
    }

    /// The stored shape of tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.metadata.info(name).map(|i| i.shape.clone())
    }

    /// The `__metadata__` string map of the header.
    pub fn user_metadata(&self) -> Option<&std::collections::HashMap<String, String>> {
        self.metadata.metadata().as_ref()
    }

    /// Reads tensor `name` converted to f32 (from F32, F16, BF16 or F64), with its shape.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let desc = || self.path.display().to_string();
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| DiffusionError::MissingTensor {
                name: name.to_string(),
                source_desc: desc(),
            })?;
        let (start, end) = info.data_offsets;
        let bytes = self
            .mmap
            .get(self.data_start + start..self.data_start + end)
            .ok_or_else(|| DiffusionError::CorruptFile {
                path: self.path.clone(),
                reason: format!("tensor `{name}` lies outside the file"),
            })?;
        let values: Vec<f32> = match info.dtype {
            StDtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            StDtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            StDtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            StDtype::F64 => bytes
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
            other => {
                return Err(DiffusionError::UnsupportedDtype {
                    name: name.to_string(),
                    source_desc: desc(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        let numel: usize = info.shape.iter().product();
        if values.len() != numel {
            return Err(DiffusionError::CorruptFile {
                path: self.path.clone(),
                reason: format!(
                    "tensor `{name}` holds {} values for shape {:?}",
                    values.len(),
                    info.shape
                ),
            });
        }
        Ok((values, info.shape.clone()))
    }
}

/// Where a diffusers-named tensor lives.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    key: String,
    /// The file stores a linear weight `[o, i]` as a 1x1 convolution `[o, i, 1, 1]`.
    squeeze_1x1: bool,
}

/// The tensors of one model component under diffusers names.
#[derive(Debug, Clone, Default)]
pub struct WeightStore {
    files: Vec<Arc<SafetensorsFile>>,
    entries: BTreeMap<String, Entry>,
    /// When set, every requested tensor is generated (see [`WeightStore::synthetic`]).
    synthetic_seed: Option<u64>,
}

/// A deterministic value in [-1, 1) from a seed, a tensor name and an index (splitmix64).
fn synthetic_value(seed: u64, name_hash: u64, i: u64) -> f32 {
    let mut z = seed ^ name_hash ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

impl WeightStore {
    /// A store over every tensor of `files`, each under its own name with `strip_prefix` removed
    /// when present.
    pub fn from_files(files: Vec<Arc<SafetensorsFile>>, strip_prefix: &str) -> Self {
        let mut store = Self {
            files,
            entries: BTreeMap::new(),
            synthetic_seed: None,
        };
        for fi in 0..store.files.len() {
            for key in store.files[fi].names() {
                let name = key.strip_prefix(strip_prefix).unwrap_or(&key).to_string();
                store.entries.insert(
                    name,
                    Entry {
                        file: fi,
                        key,
                        squeeze_1x1: false,
                    },
                );
            }
        }
        store
    }

    /// An empty store reading from `files`; fill it with [`WeightStore::insert`].
    pub fn with_files(files: Vec<Arc<SafetensorsFile>>) -> Self {
        Self {
            files,
            entries: BTreeMap::new(),
            synthetic_seed: None,
        }
    }

    /// A store without files that generates every tensor a model asks for, deterministically
    /// from `seed` and the tensor's name: norm weights `1 + 0.1u`, other 1-D tensors `0.05u`,
    /// matrices and kernels `u / sqrt(fan_in)` (`u` uniform in [-1, 1)). For tests and
    /// benchmarks of architectures without a checkpoint.
    pub fn synthetic(seed: u64) -> Self {
        Self {
            synthetic_seed: Some(seed),
            ..Self::default()
        }
    }

    fn generate(seed: u64, name: &str, shape: &[usize]) -> Vec<f32> {
        let name_hash = name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
        });
        let numel: usize = shape.iter().product();
        let is_norm = name.contains("norm") && !name.contains("proj");
        let (offset, scale) = match shape.len() {
            1 if is_norm && name.ends_with("weight") => (1.0, 0.1),
            1 => (0.0, 0.05),
            _ => {
                let fan_in: usize = shape[1..].iter().product();
                (0.0, 1.0 / (fan_in.max(1) as f32).sqrt())
            }
        };
        (0..numel as u64)
            .map(|i| offset + scale * synthetic_value(seed, name_hash, i))
            .collect()
    }

    /// Maps diffusers name `name` to tensor `key` of file number `file`.
    pub fn insert(&mut self, name: String, file: usize, key: String, squeeze_1x1: bool) {
        self.entries.insert(
            name,
            Entry {
                file,
                key,
                squeeze_1x1,
            },
        );
    }

    /// All diffusers names in the store, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|s| s.as_str())
    }

    /// Whether the store has tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the store has no tensor.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn describe(&self) -> String {
        let paths: Vec<String> = self
            .files
            .iter()
            .map(|f| f.path().display().to_string())
            .collect();
        paths.join(", ")
    }

    /// The shape of tensor `name` as the model sees it (1x1-conv storage squeezed).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let e = self.entries.get(name)?;
        let mut shape = self.files[e.file].shape(&e.key)?;
        if e.squeeze_1x1 && shape.len() == 4 && shape[2] == 1 && shape[3] == 1 {
            shape.truncate(2);
        }
        Some(shape)
    }

    /// Reads tensor `name` as f32 with its (model-side) shape.
    pub fn read(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| DiffusionError::MissingTensor {
                name: name.to_string(),
                source_desc: self.describe(),
            })?;
        let file = &self.files[e.file];
        let (values, mut shape) = file.read_f32(&e.key)?;
        if e.squeeze_1x1 && shape.len() == 4 && shape[2] == 1 && shape[3] == 1 {
            shape.truncate(2);
        }
        Ok((values, shape))
    }

    /// Reads tensor `name`, checking that its shape is `expected`.
    pub fn read_checked(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        if let Some(seed) = self.synthetic_seed {
            return Ok(Self::generate(seed, name, expected));
        }
        let (values, shape) = self.read(name)?;
        if shape != expected {
            let source_desc = match self.entries.get(name) {
                Some(e) if e.key != name => {
                    format!(
                        "{} (stored as `{}`)",
                        self.files[e.file].path().display(),
                        e.key
                    )
                }
                _ => self.describe(),
            };
            return Err(DiffusionError::ShapeMismatch {
                name: name.to_string(),
                source_desc,
                expected: expected.to_vec(),
                found: shape,
            });
        }
        Ok(values)
    }
}

/// Builds dfdx tensors from a [`WeightStore`] under a name prefix (`down_blocks.0.` …).
#[derive(Clone)]
pub struct Loader<'a, D, E = f32> {
    store: &'a WeightStore,
    dev: D,
    prefix: String,
    /// The element type tensors are created in (weights are converted from the file's).
    elem: std::marker::PhantomData<E>,
}

impl<'a, E: Elem, D: Device<E>> Loader<'a, D, E> {
    /// A loader at the root of `store`, creating tensors on `dev`.
    pub fn new(store: &'a WeightStore, dev: &D) -> Self {
        Self {
            store,
            dev: dev.clone(),
            prefix: String::new(),
            elem: std::marker::PhantomData,
        }
    }

    /// The same store under `prefix.name.`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        Self {
            store: self.store,
            dev: self.dev.clone(),
            prefix: format!("{}{}.", self.prefix, name),
            elem: std::marker::PhantomData,
        }
    }

    /// The same store and prefix, creating tensors of element type `E2`.
    pub fn with_elem<E2: Elem>(&self) -> Loader<'a, D, E2>
    where
        D: Device<E2>,
    {
        Loader {
            store: self.store,
            dev: self.dev.clone(),
            prefix: self.prefix.clone(),
            elem: std::marker::PhantomData,
        }
    }

    /// The device tensors are created on.
    pub fn device(&self) -> &D {
        &self.dev
    }

    fn full(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    /// Whether `prefix + name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(&self.full(name))
    }

    /// The shape of `prefix + name`, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.store.shape(&self.full(name))
    }

    /// A rank-1 tensor `[n]`.
    pub fn tensor1(&self, name: &str, n: usize) -> Result<Tensor1<D, NoneTape, E>> {
        let v = self.store.read_checked(&self.full(name), &[n])?;
        Ok(self.dev.tensor_from_vec(elems(v), (n,)))
    }

    /// A rank-2 tensor `[a, b]`.
    pub fn tensor2(&self, name: &str, s: (usize, usize)) -> Result<Tensor2<D, NoneTape, E>> {
        let v = self.store.read_checked(&self.full(name), &[s.0, s.1])?;
        Ok(self.dev.tensor_from_vec(elems(v), s))
    }

    /// A rank-4 tensor `[a, b, c, d]`.
    pub fn tensor4(
        &self,
        name: &str,
        s: (usize, usize, usize, usize),
    ) -> Result<Tensor4<D, NoneTape, E>> {
        let v = self
            .store
            .read_checked(&self.full(name), &[s.0, s.1, s.2, s.3])?;
        Ok(self.dev.tensor_from_vec(elems(v), s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    #[test]
    fn f32_f16_bf16_load_as_f32_and_other_dtypes_are_named_errors() {
        let values = [1.5f32, -0.25, 3.0, 1e-3];
        let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let bf16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let i64_bytes: Vec<u8> = [1i64, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = vec![
            (
                "a",
                TensorView::new(StDtype::F32, vec![2, 2], &f32_bytes).unwrap(),
            ),
            (
                "b",
                TensorView::new(StDtype::F16, vec![4], &f16_bytes).unwrap(),
            ),
            (
                "c",
                TensorView::new(StDtype::BF16, vec![4, 1, 1], &bf16_bytes).unwrap(),
            ),
            (
                "d",
                TensorView::new(StDtype::I64, vec![2], &i64_bytes).unwrap(),
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dtypes.safetensors");
        safetensors::serialize_to_file(views, None, &path).unwrap();
        let file = SafetensorsFile::open(&path).unwrap();
        assert_eq!(file.read_f32("a").unwrap(), (values.to_vec(), vec![2, 2]));
        let (f16, _) = file.read_f32("b").unwrap();
        let (bf16, shape) = file.read_f32("c").unwrap();
        assert_eq!(shape, vec![4, 1, 1]);
        for i in 0..4 {
            assert_eq!(f16[i], half::f16::from_f32(values[i]).to_f32());
            assert_eq!(bf16[i], half::bf16::from_f32(values[i]).to_f32());
        }
        let err = file.read_f32("d").unwrap_err().to_string();
        assert!(err.contains("`d`") && err.contains("I64"), "{err}");

        // a store squeezes 1x1-conv storage of linear weights, and checks shapes by name
        let mut store = WeightStore::with_files(vec![Arc::new(file)]);
        store.insert("lin.weight".into(), 0, "c".into(), false);
        let err = store
            .read_checked("lin.weight", &[4])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lin.weight") && err.contains("[4, 1, 1]"),
            "{err}"
        );
        let err = store.read_checked("nope", &[1]).unwrap_err().to_string();
        assert!(err.contains("`nope` is missing"), "{err}");
    }

    #[test]
    fn synthetic_store_is_deterministic() {
        let a = WeightStore::synthetic(1)
            .read_checked("x.norm1.weight", &[8])
            .unwrap();
        let b = WeightStore::synthetic(1)
            .read_checked("x.norm1.weight", &[8])
            .unwrap();
        let c = WeightStore::synthetic(2)
            .read_checked("x.norm1.weight", &[8])
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|v| (0.9..=1.1).contains(v)));
    }
}
