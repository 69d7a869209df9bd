//! The cache: content-addressed blobs, one small record per stage key (the commit point),
//! per-key locks that die with their process, and a stat memo for hashing big files.

mod atomic;
mod hash;
mod key;
mod lock;
pub mod store;

pub use atomic::{atomic_write, sync_dir};
pub use hash::{FileHasher, hash_bytes};
pub use key::{KEY_SCHEMA, KeyMaterial, canonical_json};
pub use lock::KeyLock;
pub use store::{BlobRef, CacheError, Record, Store};
