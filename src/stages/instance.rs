//! One runnable stage instance of a pipeline.

use super::StageParams;

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
