//! The plan shown before a run and the summary table after it.

use std::fmt::Write as _;

use super::execute::{Outcome, RunReport};
use super::plan::{PlanEntry, PlanStatus};

/// The plan in words: one line per stage instance.
pub fn print_plan(pipeline: &str, entries: &[PlanEntry]) -> String {
    let width = entries
        .iter()
        .map(|e| e.stage.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    let stale = entries
        .iter()
        .filter(|e| e.status != PlanStatus::Fresh)
        .count();
    let mut out = format!(
        "plan for {pipeline}: {} stage{}, {stale} to run\n",
        entries.len(),
        if entries.len() == 1 { "" } else { "s" }
    );
    for e in entries {
        let status = match e.status {
            PlanStatus::Fresh => "fresh",
            PlanStatus::Stale => "stale",
            PlanStatus::Forced => "forced",
            PlanStatus::Failed => "failed",
            PlanStatus::Error => "error",
        };
        let _ = write!(out, "  {:<width$}  {:<6}", e.stage, status);
        if !e.reason.is_empty() {
            let _ = write!(out, "  {}", e.reason);
        }
        out.push('\n');
    }
    out
}

/// The summary table of a run.
pub fn print_summary(report: &RunReport) -> String {
    let width = report
        .stages
        .iter()
        .map(|s| s.stage.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{:<width$}  {:<9}  {:>8}  {:<12}  result",
        "stage", "status", "time", "key"
    );
    let mut failures = Vec::new();
    for s in &report.stages {
        let (status, detail) = match &s.outcome {
            Outcome::Computed => ("computed", s.summary.clone()),
            Outcome::Cached => ("cached", s.summary.clone()),
            Outcome::Failed(e) => {
                failures.push((s.stage.clone(), e.clone()));
                ("FAILED", first_line(e))
            }
            Outcome::Skipped(why) => ("skipped", why.clone()),
            Outcome::Cancelled => ("cancelled", String::new()),
            Outcome::NotRun => ("not run", String::new()),
        };
        let key = s
            .key
            .as_deref()
            .map(|k| &k[..12.min(k.len())])
            .unwrap_or("-");
        let _ = writeln!(
            out,
            "{:<width$}  {:<9}  {:>7.2}s  {:<12}  {}",
            s.stage, status, s.duration_s, key, detail
        );
    }
    let computed = report
        .stages
        .iter()
        .filter(|s| s.outcome == Outcome::Computed)
        .count();
    let cached = report
        .stages
        .iter()
        .filter(|s| s.outcome == Outcome::Cached)
        .count();
    let _ = writeln!(
        out,
        "\n{} in {:.2}s: {computed} computed, {cached} cached{}",
        report.pipeline,
        report.duration_s,
        if failures.is_empty() {
            String::new()
        } else {
            format!(", {} failed", failures.len())
        }
    );
    // Where to look: the page of every report stage that finished.
    for s in &report.stages {
        if s.kind == "report"
            && matches!(s.outcome, Outcome::Computed | Outcome::Cached)
            && let Some(dir) = &s.outputs
        {
            let _ = writeln!(
                out,
                "report: {}",
                display_path(&dir.join("report.html")).display()
            );
        }
    }
    for (stage, error) in failures {
        let _ = writeln!(
            out,
            "\nerror in stage {stage}:\n  {}",
            error.replace('\n', "\n  ")
        );
    }
    if report.environment_failed() {
        let _ = writeln!(
            out,
            "\nthe machine refused a write (disk full, read-only or forbidden folder): make room or \
             fix the permissions and rerun; finished stages and checkpoints are kept"
        );
    }
    out
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or("");
    if line.chars().count() > 100 {
        format!("{}…", line.chars().take(100).collect::<String>())
    } else {
        line.to_string()
    }
}

/// `path` relative to the current directory when it lies below it (as users type paths).
fn display_path(path: &std::path::Path) -> std::path::PathBuf {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| {
            path.strip_prefix(cwd)
                .ok()
                .map(std::path::Path::to_path_buf)
        })
        .unwrap_or_else(|| path.to_path_buf())
}
