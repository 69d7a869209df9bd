//! The pipeline model: a TOML file parsed into settings and a DAG of expanded stage instances.

mod diagnostic;
mod graph;
mod matrix;
mod parse;
mod source;

pub(crate) use crate::names::{self, did_you_mean};
pub use crate::settings::PipelineSettings;
pub use crate::stages::StageInstance;
pub use diagnostic::{PipelineError, ReadError, line_col};
pub use parse::{LoadError, load, parse};

use std::path::PathBuf;

/// A parsed, defaulted and validated pipeline: settings plus stage instances in topological
/// order (every stage comes after all the stages it needs).
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The pipeline file (absolute).
    pub path: PathBuf,
    /// The directory relative paths in the file resolve against.
    pub dir: PathBuf,
    /// `[pipeline]`.
    pub settings: PipelineSettings,
    /// Expanded stage instances, topologically sorted.
    pub stages: Vec<StageInstance>,
}

impl Pipeline {
    /// The pipeline's name (`[pipeline] name`, or the file stem).
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The instance called `name`.
    pub fn stage(&self, name: &str) -> Option<&StageInstance> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// The instances that `name` selects: an instance name, or a base stage name (all its
    /// instances).
    pub fn select(&self, name: &str) -> Vec<&StageInstance> {
        self.stages
            .iter()
            .filter(|s| s.name == name || s.base == name)
            .collect()
    }
}
