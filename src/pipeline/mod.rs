//! The pipeline model: a TOML file parsed into settings and a DAG of expanded stage instances.

mod diagnostic;
mod graph;
mod matrix;
pub mod names;
mod parse;
mod settings;

pub use diagnostic::{PipelineError, ReadError, did_you_mean, line_col};
pub use parse::{LoadError, load, parse, resolve as resolve_path};
pub use settings::PipelineSettings;

use std::path::PathBuf;

use crate::stages::StageParams;

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

/// One runnable stage: a `[stage.NAME]` table, or one point of its `matrix`.
#[derive(Debug, Clone)]
pub struct StageInstance {
    /// Unique name: `NAME` or `NAME@key=value,...` for matrix points.
    pub name: String,
    /// The `[stage.NAME]` it comes from.
    pub base: String,
    /// Parsed, defaulted and normalised parameters of its kind.
    pub params: StageParams,
    /// Names of the instances it needs (a `needs` entry naming a matrixed stage means all of
    /// its instances).
    pub needs: Vec<String>,
    /// The matrix point, in declaration order (empty without a matrix).
    pub matrix: Vec<(String, String)>,
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
