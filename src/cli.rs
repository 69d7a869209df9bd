//! The command line: parsing with clap and dispatch to the library. Exit codes: see
//! [`crate::exit`].

use crate::exit::ExitCode;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::cache::Store;
use crate::engine::{self, CancelToken, Progress, RunLock, RunOptions, Workspace};
use crate::pipeline;

/// Fine-tune Stable Diffusion from declarative, cached TOML pipelines.
#[derive(Debug, Parser)]
#[command(name = "sdpipe", version, about, long_about = None)]
pub struct Cli {
    /// Cache directory (holds `cache-v1/`). Default: ./.sdpipe
    #[arg(long, global = true, env = "SDPIPE_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Outputs directory (a pipeline writes under `<DIR>/<name>/`). Default: ./outputs
    #[arg(long, global = true, env = "SDPIPE_OUTPUTS", value_name = "DIR")]
    pub outputs: Option<PathBuf>,
    /// No progress bars or messages, only results and errors.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a pipeline: plan, compute what is stale, print a summary.
    Run {
        /// The pipeline file.
        file: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Show which stages are fresh or stale and why, writing nothing.
    Plan {
        /// The pipeline file.
        file: PathBuf,
        /// Print a JSON array of {"stage", "status", "reason", "key"}.
        #[arg(long)]
        json: bool,
        /// Treat these stages as forced.
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
        /// Plan as if the pipeline's `device` were this (see `run --device`).
        #[arg(long, value_name = "DEVICE")]
        device: Option<crate::device::DeviceChoice>,
    },
    /// Run, then re-plan and run again on every save of the file or its inputs.
    Watch {
        /// The pipeline file.
        file: PathBuf,
        #[command(flatten)]
        run: RunArgs,
        /// Quiet time after a change before re-planning, in milliseconds.
        #[arg(long, default_value_t = 300)]
        debounce_ms: u64,
    },
    /// Generate images from a prompt with a Stable Diffusion 1.x model (one-off text-to-image;
    /// PNGs carry A1111 `parameters`; see `sdpipe::sample`).
    Sample(Box<crate::sample::SampleArgs>),
    /// Write images of the synthetic world (or of one of its concepts) with caption sidecars:
    /// `NAME.png` + `NAME.txt` per image (see `sdpipe::world`).
    World(WorldArgs),
    /// Time a training or inference task of the diffusion core on random data: step ms,
    /// throughput and peak memory (see `sdpipe::bench`).
    Bench(Box<crate::bench::BenchArgs>),
    /// Run every op family and model part on the GPU and on the CPU and compare (see
    /// `sdpipe::device_check`; exit 4 when there is no GPU to compare).
    DeviceCheck(crate::device_check::DeviceCheckArgs),
    /// Inspect or clean the cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
}

/// Options of `run` and `watch`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Recompute this stage (instance or stage name) even if cached; repeatable.
    #[arg(long, value_name = "STAGE")]
    pub force: Vec<String>,
    /// Stop at the first failure (default: keep going; a failure skips only its dependents).
    #[arg(long)]
    pub fail_fast: bool,
    /// Run even when a train stage's estimated peak memory exceeds what the device has
    /// (`SDPIPE_MEMORY_LIMIT` sets that figure; see `sdpipe plan`).
    #[arg(long)]
    pub no_memory_check: bool,
    /// Run the model stages on this device instead of the pipeline's `device`:
    /// auto, cpu or cuda:N.
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<crate::device::DeviceChoice>,
}

/// Applies a `--device` override for the whole process (a usage error when this build cannot
/// use it).
fn apply_device(device: Option<crate::device::DeviceChoice>) -> Result<(), ExitCode> {
    if let Some(d) = device {
        crate::device::check_supported(d).map_err(|e| {
            eprintln!("error: --device: {e}");
            ExitCode::Usage
        })?;
        crate::device::set_override(d);
    }
    Ok(())
}

/// Options of `world`.
#[derive(Debug, Args)]
pub struct WorldArgs {
    /// Folder to write into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// How many images.
    #[arg(long, default_value_t = 8)]
    pub count: usize,
    /// Seed of the first image (image i uses seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image side in pixels (8 to 1024).
    #[arg(long, default_value_t = 64)]
    pub resolution: u32,
    /// A concept instead of the base world: heart, striped or outline.
    #[arg(long, value_name = "NAME")]
    pub concept: Option<String>,
}

/// `cache` subcommands.
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Print what the cache holds.
    Size {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Free space: drop entries no pipeline's last run uses and not used within --max-age.
    Gc {
        /// Say what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep unreferenced entries used more recently than this (e.g. 7d, 12h, 0s).
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        max_age: Duration,
    },
    /// Re-hash every blob the cache references and report any damage.
    Verify,
}

/// Runs the parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    // Long diagnostics stay on one line so `file:line:col: message` can be grepped.
    let _ = miette::set_hook(Box::new(|_| {
        Box::new(miette::MietteHandlerOpts::new().wrap_lines(false).build())
    }));
    let ws = Workspace::new(cli.cache_dir.as_deref(), cli.outputs.as_deref());
    let progress = Progress::new(cli.quiet);
    let device = match &cli.command {
        Command::Run { run, .. } | Command::Watch { run, .. } => run.device,
        Command::Plan { device, .. } => *device,
        _ => None,
    };
    if let Err(code) = apply_device(device) {
        return code;
    }
    match cli.command {
        Command::Run { file, run } => cmd_run(&file, &ws, &run, &progress, cli.quiet),
        Command::Plan {
            file, json, force, ..
        } => cmd_plan(&file, &ws, json, force),
        Command::Watch {
            file,
            run,
            debounce_ms,
        } => {
            engine::install_ctrlc_handler();
            let opts = RunOptions {
                force: run.force.into_iter().collect(),
                fail_fast: run.fail_fast,
                memory_check: !run.no_memory_check,
                pause: test_pause(),
                ..Default::default()
            };
            match engine::watch(
                &file,
                &ws,
                opts,
                &progress,
                Duration::from_millis(debounce_ms),
            ) {
                Ok(code) => code,
                Err(e) => environment_error(&e),
            }
        }
        Command::Sample(args) => crate::sample::run_with(*args, cli.quiet),
        Command::DeviceCheck(args) => crate::device_check::run(&args),
        Command::Cache { command } => cmd_cache(command, &ws),
        Command::World(args) => cmd_world(&args),
        Command::Bench(args) => crate::bench::run_cli(&args, cli.quiet),
    }
}

fn cmd_world(args: &WorldArgs) -> ExitCode {
    use crate::world::{WorldError, write_dataset};
    match write_dataset(
        &args.out,
        args.count,
        args.seed,
        args.resolution,
        args.concept.as_deref(),
    ) {
        Ok(written) => {
            for w in &written {
                crate::outln!("{}: {}", w.image.display(), w.caption);
            }
            ExitCode::Ok
        }
        Err(e @ (WorldError::UnknownConcept { .. } | WorldError::Resolution(_))) => {
            eprintln!("error: {e}");
            ExitCode::Usage
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::Environment
        }
    }
}

fn load(file: &Path) -> Result<pipeline::Pipeline, ExitCode> {
    pipeline::load(file).map_err(|e| {
        eprintln!("{:?}", miette::Report::new(e));
        ExitCode::Usage
    })
}

fn cmd_run(
    file: &Path,
    ws: &Workspace,
    args: &RunArgs,
    progress: &Progress,
    quiet: bool,
) -> ExitCode {
    let p = match load(file) {
        Ok(p) => p,
        Err(code) => return code,
    };
    engine::install_ctrlc_handler();
    let force: BTreeSet<String> = args.force.iter().cloned().collect();
    if let Err(code) = check_force(&p, &force) {
        return code;
    }
    let entries = engine::plan_readonly(&p, ws, &force);
    if !quiet {
        eprint!("{}", engine::print_plan(p.name(), &entries));
    }
    if let Err(code) = check_memory(&p, &entries, args.no_memory_check, quiet) {
        return code;
    }
    let opts = RunOptions {
        force,
        fail_fast: args.fail_fast,
        pause: test_pause(),
        ..Default::default()
    };
    match engine::execute(&p, ws, &opts, progress, &CancelToken::new()) {
        Ok(report) => {
            crate::out!("{}", engine::print_summary(&report));
            if report.cancelled() || engine::interrupted() {
                ExitCode::Interrupted
            } else if report.environment_failed() {
                ExitCode::Environment
            } else if report.failed() {
                ExitCode::Failed
            } else {
                ExitCode::Ok
            }
        }
        Err(e) => environment_error(&e),
    }
}

/// Prints the memory estimate of the train stages that will run and refuses the run (exit
/// code 4) when one exceeds the available memory, unless `skip`.
fn check_memory(
    p: &pipeline::Pipeline,
    entries: &[engine::PlanEntry],
    skip: bool,
    quiet: bool,
) -> Result<(), ExitCode> {
    use crate::memory::stages::{Verdict, gate};
    let (report, verdict) = gate(p, &engine::stages_to_run(entries));
    if !quiet {
        eprint!("{report}");
    }
    match verdict {
        _ if skip => Ok(()),
        Verdict::Fits => Ok(()),
        Verdict::Refused(message) => {
            eprintln!("error: {message}");
            Err(ExitCode::Device)
        }
        Verdict::BadLimit(message) => {
            eprintln!("error: {message}");
            Err(ExitCode::Usage)
        }
    }
}

fn check_force(p: &pipeline::Pipeline, force: &BTreeSet<String>) -> Result<(), ExitCode> {
    for name in force {
        if p.select(name).is_empty() {
            let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
            let hint = pipeline::did_you_mean(name, names.iter().copied())
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            eprintln!(
                "error: --force {name}: no such stage{hint}; stages: {}",
                names.join(", ")
            );
            return Err(ExitCode::Usage);
        }
    }
    Ok(())
}

fn cmd_plan(file: &Path, ws: &Workspace, json: bool, force: Vec<String>) -> ExitCode {
    let p = match load(file) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let force: BTreeSet<String> = force.into_iter().collect();
    if let Err(code) = check_force(&p, &force) {
        return code;
    }
    let entries = engine::plan_readonly(&p, ws, &force);
    if json {
        match plan_json(&p, &entries) {
            Ok(s) => crate::outln!("{s}"),
            Err(e) => return environment_error(&e.into()),
        }
    } else {
        crate::out!("{}", engine::print_plan(p.name(), &entries));
        let list = crate::memory::stages::train_stage_estimates(&p);
        if let Some(first) = list.first() {
            let available = crate::memory::available(&first.device);
            crate::out!(
                "{}",
                crate::memory::stages::print_estimates(&list, &available)
            );
            if let Ok(a) = &available
                && let Some(message) = crate::memory::stages::refusal(&list, a)
            {
                eprintln!("warning: `sdpipe run` would refuse: {message}");
            }
        }
    }
    ExitCode::Ok
}

/// `plan --json`: the plan entries; each train or pretrain stage's entry also has `memory`:
/// the estimate (`estimate` with its parts in bytes, `device`, `available_bytes` and its
/// `available_source`, `fits`), or `error` saying why there is none.
fn plan_json(
    p: &pipeline::Pipeline,
    entries: &[engine::PlanEntry],
) -> Result<String, serde_json::Error> {
    let mut value = serde_json::to_value(entries)?;
    let list = crate::memory::stages::train_stage_estimates(p);
    let available = list
        .first()
        .map(|first| crate::memory::available(&first.device));
    if let Some(rows) = value.as_array_mut() {
        for row in rows {
            let Some(stage) = row.get("stage").and_then(|s| s.as_str()) else {
                continue;
            };
            let Some(m) = list.iter().find(|m| m.stage == stage) else {
                continue;
            };
            let memory = match (&m.estimate, &available) {
                (Ok(e), Some(Ok(a))) => serde_json::json!({
                    "device": m.device,
                    "estimate": e,
                    "available_bytes": a.bytes,
                    "available_source": a.source,
                    "fits": e.total <= a.bytes,
                }),
                (Ok(e), _) => serde_json::json!({ "device": m.device, "estimate": e }),
                (Err(why), _) => serde_json::json!({ "device": m.device, "error": why }),
            };
            if let Some(obj) = row.as_object_mut() {
                obj.insert("memory".into(), memory);
            }
        }
    }
    serde_json::to_string_pretty(&value)
}

fn cmd_cache(command: CacheCommand, ws: &Workspace) -> ExitCode {
    let Some(store) = Store::open_existing(&ws.cache_root) else {
        crate::outln!("no cache at {}", ws.cache_root.display());
        return ExitCode::Ok;
    };
    match command {
        CacheCommand::Size { json } => {
            let u = store.usage();
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&u).unwrap_or_default());
            } else {
                crate::outln!("cache {}", store.root().display());
                crate::outln!("  blobs    {} ({})", u.blobs, human_bytes(u.blob_bytes));
                crate::outln!("  records  {}", u.records);
                crate::outln!("  scratch  {}", human_bytes(u.scratch_bytes));
                if u.temp_files > 0 {
                    crate::outln!(
                        "  leftover temp files {} (removed by `sdpipe cache gc`)",
                        u.temp_files
                    );
                }
            }
            ExitCode::Ok
        }
        CacheCommand::Gc { dry_run, max_age } => {
            // Exclusive against runs: what a live run wrote but has not committed is not
            // garbage, and the roots are read after the last run's lock was written.
            let _lock = if dry_run {
                None
            } else {
                match store.gc_lock(|| {
                    eprintln!(
                        "waiting for the runs using {} to end",
                        store.root().display()
                    )
                }) {
                    Ok(l) => Some(l),
                    Err(e) => return environment_error(&e.into()),
                }
            };
            let roots = RunLock::all_keys(&ws.outputs_root);
            let staging = crate::engine::sweep_stale_staging(&ws.outputs_root, dry_run);
            match store.gc(&roots, max_age, dry_run) {
                Ok(r) => {
                    crate::outln!(
                        "{} {} records, {} blobs ({}), {} temp files/scratch dirs",
                        if dry_run { "would remove" } else { "removed" },
                        r.records,
                        r.blobs,
                        human_bytes(r.bytes),
                        r.other + staging
                    );
                    ExitCode::Ok
                }
                Err(e) => environment_error(&e.into()),
            }
        }
        CacheCommand::Verify => {
            let problems = store.verify();
            if problems.is_empty() {
                crate::outln!("cache {} is consistent", store.root().display());
                ExitCode::Ok
            } else {
                for p in &problems {
                    crate::outln!("{p}");
                }
                ExitCode::Environment
            }
        }
    }
}

fn environment_error(e: &anyhow::Error) -> ExitCode {
    eprintln!("error: {}", crate::control::error_chain::describe_anyhow(e));
    ExitCode::Environment
}

fn human_bytes(n: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The pause at each stage's yield points that the kill, watch and concurrency tests ask for
/// with `SDPIPE_TEST_ITEM_DELAY_MS` (milliseconds), to interrupt a stage mid-way.
fn test_pause() -> Option<Duration> {
    let ms = std::env::var("SDPIPE_TEST_ITEM_DELAY_MS")
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms))
}
