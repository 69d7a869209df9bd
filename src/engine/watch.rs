//! `watch`: re-plan and run on every save of the pipeline file or a declared input.
//!
//! Changes are debounced. A change invalidates the stages whose parameters or inputs changed,
//! and everything downstream of them: the running stage is cancelled if it is among them,
//! stages of the current run that are not are left to finish, and the new plan runs next.

use crate::exit::ExitCode;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use notify::{RecursiveMode, Watcher};

use super::execute::{RunOptions, RunningSlot, execute};
use super::plan::PlanStatus;
use super::summary::{print_plan, print_summary};
use super::workspace::Workspace;
use crate::control::CancelToken;
use crate::control::Progress;
use crate::pipeline::{self, Pipeline};

/// Watches `file` and its inputs until Ctrl-C; returns the exit code of the last run.
pub fn watch(
    file: &Path,
    ws: &Workspace,
    base: RunOptions,
    progress: &Progress,
    debounce: Duration,
) -> anyhow::Result<ExitCode> {
    let (tx, rx) = mpsc::channel::<PathBuf>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && !matches!(event.kind, notify::EventKind::Access(_))
        {
            for p in event.paths {
                let _ = tx.send(p);
            }
        }
    })
    .context("cannot start the file watcher")?;
    let file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    // Watch the folder so that editors that save by rename are seen too.
    let file_dir = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    watcher
        .watch(&file_dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", file_dir.display()))?;
    let mut watched: BTreeSet<PathBuf> = BTreeSet::new();
    let mut exit_code;
    let mut changed: Vec<PathBuf> = Vec::new();

    loop {
        // (Re)load and run.
        match pipeline::load(&file) {
            Err(e) => {
                progress.message(&format!("{:?}", miette::Report::new(e)));
                progress.message("waiting for the pipeline file to be fixed...");
                exit_code = ExitCode::Usage;
            }
            Ok(p) => {
                for stage in &p.stages {
                    for path in stage.params.watch_paths() {
                        if watched.insert(path.clone()) {
                            let _ = watcher.watch(&path, RecursiveMode::Recursive);
                        }
                    }
                }
                let running: RunningSlot = Arc::new(Mutex::new(None));
                let invalidated: Arc<Mutex<BTreeSet<String>>> =
                    Arc::new(Mutex::new(BTreeSet::new()));
                let opts = RunOptions {
                    running: Some(running.clone()),
                    invalidated: Some(invalidated.clone()),
                    ..base.clone()
                };
                let entries = super::plan::plan_readonly(&p, ws, &opts.force);
                if entries.iter().any(|e| e.status != PlanStatus::Fresh) {
                    progress.message(&print_plan(p.name(), &entries));
                }
                if let Some((message, code)) = memory_refusal(&p, &entries, &opts, progress) {
                    progress.message(&format!("error: {message}"));
                    progress.message("waiting for a change that makes it fit...");
                    exit_code = code;
                } else {
                    let run_token = CancelToken::new();
                    let outcome = std::thread::scope(|scope| {
                        let handle = scope.spawn(|| execute(&p, ws, &opts, progress, &run_token));
                        // While it runs, react to changes.
                        while !handle.is_finished() {
                            match rx.recv_timeout(Duration::from_millis(100)) {
                                Ok(path) => {
                                    changed.push(path);
                                    drain(&rx, debounce, &mut changed);
                                    changed.retain(|p| is_relevant(p, &file, &watched));
                                    if changed.is_empty() {
                                        continue;
                                    }
                                    if let Ok(next) = pipeline::load(&file) {
                                        let names = invalidated_stages(&p, &next, &changed);
                                        if !names.is_empty() {
                                            let mut inv = invalidated
                                                .lock()
                                                .unwrap_or_else(|e| e.into_inner());
                                            inv.extend(names.iter().cloned());
                                            if let Some((name, _, token)) =
                                                &*running.lock().unwrap_or_else(|e| e.into_inner())
                                                && names.contains(name)
                                            {
                                                progress.message(&format!(
                                                    "{name} changed: cancelling it"
                                                ));
                                                token.cancel();
                                            }
                                        }
                                    }
                                }
                                Err(RecvTimeoutError::Timeout) => {}
                                Err(RecvTimeoutError::Disconnected) => break,
                            }
                            if crate::control::interrupted() {
                                run_token.cancel();
                            }
                        }
                        handle.join()
                    });
                    match outcome {
                        Ok(Ok(report)) => {
                            progress.message(&print_summary(&report));
                            exit_code = if report.failed() {
                                ExitCode::Failed
                            } else {
                                ExitCode::Ok
                            };
                        }
                        Ok(Err(e)) => {
                            progress.message(&format!(
                                "error: {}",
                                crate::control::error_chain::describe_anyhow(&e)
                            ));
                            exit_code = ExitCode::Environment;
                        }
                        Err(_) => {
                            progress.message("error: the run panicked");
                            exit_code = ExitCode::Environment;
                        }
                    }
                }
            }
        }
        if crate::control::interrupted() {
            return Ok(ExitCode::Interrupted);
        }
        // Wait for the next relevant change (one may have arrived during the run).
        changed.retain(|p| is_relevant(p, &file, &watched));
        if changed.is_empty() {
            progress.message(&format!("watching {} (Ctrl-C to stop)", file.display()));
        }
        while changed.is_empty() {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(path) => {
                    if is_relevant(&path, &file, &watched) {
                        changed.push(path);
                        drain(&rx, debounce, &mut changed);
                        changed.retain(|p| is_relevant(p, &file, &watched));
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if crate::control::interrupted() {
                        return Ok(ExitCode::Interrupted);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(exit_code),
            }
        }
        let names: BTreeSet<String> = changed.drain(..).map(|p| p.display().to_string()).collect();
        progress.message(&format!(
            "\nchanged: {}",
            names.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
}

/// The pipeline file itself, or something under a declared input (not our own outputs).
fn is_relevant(path: &Path, file: &Path, watched: &BTreeSet<PathBuf>) -> bool {
    path == file || watched.iter().any(|w| path.starts_with(w))
}

/// Collects further events until none arrives for `debounce`.
fn drain(rx: &mpsc::Receiver<PathBuf>, debounce: Duration, into: &mut Vec<PathBuf>) {
    while let Ok(p) = rx.recv_timeout(debounce) {
        into.push(p);
    }
}

/// Stages of `old` whose parameters changed in `new`, or whose inputs are among `changed`,
/// plus everything downstream of them.
fn invalidated_stages(old: &Pipeline, new: &Pipeline, changed: &[PathBuf]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for stage in &old.stages {
        let params_changed = new
            .stage(&stage.name)
            .is_none_or(|n| n.params != stage.params || n.needs != stage.needs);
        let input_changed = stage
            .params
            .watch_paths()
            .iter()
            .any(|w| changed.iter().any(|c| c.starts_with(w)));
        let upstream_changed = stage.needs.iter().any(|n| out.contains(n));
        if params_changed || input_changed || upstream_changed {
            out.insert(stage.name.clone());
        }
    }
    out
}

/// With `opts.memory_check`: prints the estimate of the train stages this run will compute and
/// returns why (and exit code 4, or 2 for a malformed limit) when one will not fit.
fn memory_refusal(
    p: &Pipeline,
    entries: &[super::PlanEntry],
    opts: &RunOptions,
    progress: &Progress,
) -> Option<(String, ExitCode)> {
    use crate::memory::stages::{Verdict, gate};
    if !opts.memory_check {
        return None;
    }
    let (report, verdict) = gate(p, &super::stages_to_run(entries));
    if !report.is_empty() {
        progress.message(report.trim_end());
    }
    match verdict {
        Verdict::Fits => None,
        Verdict::Refused(message) => Some((message, ExitCode::Device)),
        Verdict::BadLimit(message) => Some((message, ExitCode::Usage)),
    }
}
