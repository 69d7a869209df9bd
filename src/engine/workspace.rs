//! Where a pipeline's cache and outputs live.

use std::path::{Path, PathBuf};

/// Directory name of the versioned cache under the cache dir.
pub const CACHE_VERSION_DIR: &str = "cache-v1";

/// The cache root and the outputs root used by a command.
#[derive(Debug, Clone)]
pub struct Workspace {
    /// `<cache dir>/cache-v1`.
    pub cache_root: PathBuf,
    /// The `outputs/` folder; a pipeline writes under `outputs/<name>/`.
    pub outputs_root: PathBuf,
}

impl Workspace {
    /// From the command-line/environment overrides, defaulting to `./.sdpipe` and `./outputs`.
    pub fn new(cache_dir: Option<&Path>, outputs: Option<&Path>) -> Workspace {
        let cache_dir = cache_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".sdpipe"));
        Workspace {
            cache_root: absolute(&cache_dir.join(CACHE_VERSION_DIR)),
            outputs_root: absolute(
                &outputs
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("outputs")),
            ),
        }
    }

    /// `outputs/<pipeline name>/`.
    pub fn pipeline_outputs(&self, name: &str) -> PathBuf {
        self.outputs_root.join(name)
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
