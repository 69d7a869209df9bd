//! Planning and running a pipeline: stage keys, fresh/stale with reasons, execution with
//! keep-going or fail-fast, run records and friendly output paths, and `watch`.

mod execute;
mod material;
mod outputs;
mod plan;
mod summary;
mod watch;
mod workspace;

pub use crate::control::{CancelToken, Progress, install_ctrlc_handler, interrupted};
pub use execute::{RunOptions, execute};
pub use outputs::{RunLock, sweep_stale_staging};
pub use plan::{PlanEntry, plan_readonly, stages_to_run};
pub use summary::{print_plan, print_summary};
pub use watch::watch;
pub use workspace::Workspace;
