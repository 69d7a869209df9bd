//! The memory estimate of each train and pretrain stage of a pipeline (printed by `plan` and
//! `run`), and the refusal of a run whose stale training stage would not fit in the device's
//! memory.

use std::fmt::Write as _;

use super::estimate::{MemoryEstimate, TrainShape, TrainedPart, estimate_pretrain, estimate_train};
use super::{Available, human_bytes};
use crate::diffusion::checkpoint::single_file::StoredConfigs;
use crate::diffusion::nn::DEFAULT_ATTENTION_CHUNK;
use crate::pipeline::{Pipeline, StageInstance};
use crate::stages::{Method, PretrainInit, StageParams, TrainParams};

/// The estimate of one train stage instance.
#[derive(Debug, Clone)]
pub struct StageMemory {
    /// Instance name.
    pub stage: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Samples per micro-batch.
    pub batch: usize,
    /// Training resolution (the upstream preprocess stage's), pixels.
    pub resolution: u32,
    /// The estimate, or why there is none (no base model, no preprocess upstream).
    pub estimate: Result<MemoryEstimate, String>,
    /// The method (`None`: a `pretrain` stage).
    pub method: Option<Method>,
    /// Whether the UNet computes in f16 (`precision = "f16"`).
    pub half: bool,
    /// The key that sets how many parameters train, with its value (`lora.rank (now 16)`):
    /// the advice when the training state, not the activations, is what does not fit.
    pub size_key: Option<String>,
}

/// The resolution of the preprocess stage `instance` depends on (through encode_latents).
fn upstream_resolution(pipeline: &Pipeline, instance: &StageInstance) -> Option<u32> {
    let mut queue: Vec<&str> = instance.needs.iter().map(String::as_str).collect();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(name) = queue.pop() {
        if !seen.insert(name) {
            continue;
        }
        let Some(up) = pipeline.stage(name) else {
            continue;
        };
        match &up.params {
            StageParams::Preprocess(p) => return Some(p.resolution),
            StageParams::EncodeLatents(_) => {
                queue.extend(up.needs.iter().map(String::as_str));
            }
            _ => {}
        }
    }
    None
}

/// What `p` trains.
pub fn trained_part(p: &TrainParams, configs: &StoredConfigs) -> TrainedPart {
    match p.method {
        Method::Lora | Method::Locon | Method::Loha | Method::Lokr | Method::Dora => {
            TrainedPart::Lora {
                rank: p.lora.rank,
                targets: p.lora.targets.clone(),
                text_encoder: (p.lora.text_encoder).then(|| p.lora.text_encoder_targets.clone()),
                method: p.method,
            }
        }
        Method::TextualInversion => TrainedPart::TextualInversion {
            vectors: p.textual_inversion.num_vectors,
        },
        Method::Dreambooth => TrainedPart::FullUnet {
            text_encoder: p.dreambooth.train_text_encoder,
        },
        Method::Hypernetwork => {
            let h = &p.hypernetwork;
            let widths = h
                .sizes
                .clone()
                .unwrap_or_else(|| vec![configs.text_encoder.hidden_size]);
            let ls = &h.layer_structure;
            let mut params = 0usize;
            for w in widths {
                for pair in ls.windows(2) {
                    let (a, b) = ((pair[0] * w as f64) as usize, (pair[1] * w as f64) as usize);
                    params += a * b + b + if h.layer_norm { 2 * b } else { 0 };
                }
            }
            // one MLP for the keys and one for the values
            TrainedPart::Hypernetwork { params: 2 * params }
        }
    }
}

/// The estimate of every train and pretrain stage of `pipeline` on its device.
pub fn train_stage_estimates(pipeline: &Pipeline) -> Vec<StageMemory> {
    let device = crate::device::resolve(pipeline.settings.device);
    let mut base: Option<Result<StoredConfigs, String>> = None;
    let mut base_configs = || {
        base.get_or_insert_with(|| {
            crate::stages::model::open_checkpoint(&pipeline.settings)
                .map(|c| c.configs())
                .map_err(|e| format!("{e:#}"))
        })
        .clone()
    };
    let mut out = Vec::new();
    for instance in &pipeline.stages {
        let p = match &instance.params {
            StageParams::Train(p) => p,
            StageParams::Pretrain(p) => {
                let configs = match p.init {
                    PretrainInit::Random => Ok(p
                        .architecture
                        .clone()
                        .unwrap_or_default()
                        .configs(p.resolution)),
                    PretrainInit::BaseModel => base_configs(),
                };
                out.push(StageMemory {
                    stage: instance.name.clone(),
                    device: device.clone(),
                    batch: p.batch_size,
                    resolution: p.resolution,
                    estimate: configs.and_then(|c| {
                        estimate_pretrain(
                            &c,
                            p.vae_batch_size,
                            p.batch_size,
                            p.resolution as usize,
                            &device,
                        )
                    }),
                    method: None,
                    half: false,
                    size_key: None,
                });
                continue;
            }
            _ => continue,
        };
        let configs = &base_configs();
        let resolution = upstream_resolution(pipeline, instance);
        let estimate = match (configs.as_ref(), resolution) {
            (Err(e), _) => Err(e.clone()),
            (_, None) => Err("no preprocess stage upstream gives the resolution".into()),
            (Ok(c), Some(r)) => estimate_train(
                c,
                &trained_part(p, c),
                &TrainShape {
                    batch: p.batch_size,
                    height: r as usize,
                    width: r as usize,
                    attention_chunk: DEFAULT_ATTENTION_CHUNK,
                    gradient_checkpointing: p.gradient_checkpointing,
                    device: device.clone(),
                    loaded: Default::default(),
                    unet_elem_bytes: match pipeline.settings.precision {
                        crate::device::Precision::F16 => 2,
                        _ => 4,
                    },
                    optimizer: p.optimizer,
                    ema: p.ema_decay.is_some(),
                },
            ),
        };
        out.push(StageMemory {
            stage: instance.name.clone(),
            device: device.clone(),
            batch: p.batch_size,
            resolution: resolution.unwrap_or(0),
            estimate,
            method: Some(p.method),
            half: pipeline.settings.precision == crate::device::Precision::F16,
            size_key: match p.method {
                Method::Lora | Method::Locon | Method::Loha | Method::Lokr | Method::Dora => {
                    Some(format!("lora.rank (now {})", p.lora.rank))
                }
                Method::TextualInversion => Some(format!(
                    "textual_inversion.num_vectors (now {})",
                    p.textual_inversion.num_vectors
                )),
                Method::Hypernetwork => Some(format!(
                    "hypernetwork.layer_structure (now {:?})",
                    p.hypernetwork.layer_structure
                )),
                Method::Dreambooth => None,
            },
        });
    }
    out
}

/// The `memory` section of a plan: one line per train stage, with what is available.
pub fn print_estimates(list: &[StageMemory], available: &Result<Available, String>) -> String {
    if list.is_empty() {
        return String::new();
    }
    let device = &list[0].device;
    let avail = match available {
        Ok(a) => format!("{} available ({})", human_bytes(a.bytes), a.source),
        Err(e) => format!("available memory unknown: {e}"),
    };
    let precision = if list[0].half { " (UNet in f16)" } else { "" };
    let mut out = format!("peak memory estimate on {device}{precision}, {avail}\n");
    let width = list.iter().map(|s| s.stage.len()).max().unwrap_or(5);
    for s in list {
        let line = match &s.estimate {
            Ok(e) => {
                let over = matches!(available, Ok(a) if e.total > a.bytes);
                format!(
                    "~{}{}",
                    e.describe(),
                    if over { "  WILL NOT FIT" } else { "" }
                )
            }
            Err(why) => format!("unknown: {why}"),
        };
        let _ = writeln!(out, "  {:<width$}  {line}", s.stage);
    }
    out
}

/// What the memory check before a run found ([`gate`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Nothing to check, or every estimate fits (or the available memory is unknown).
    Fits,
    /// A stage will not fit: why, naming it.
    Refused(String),
    /// [`super::MEMORY_LIMIT_ENV`] is malformed: what is wrong.
    BadLimit(String),
}

/// The memory check before a run (`run`, and each run of `watch`): the estimate section to
/// print (empty when no train stage will run) and the verdict for the stages in `will_run`.
pub fn gate(pipeline: &Pipeline, will_run: &std::collections::BTreeSet<&str>) -> (String, Verdict) {
    let list: Vec<_> = train_stage_estimates(pipeline)
        .into_iter()
        .filter(|s| will_run.contains(s.stage.as_str()))
        .collect();
    if list.is_empty() {
        return (String::new(), Verdict::Fits);
    }
    let available = super::available(&list[0].device);
    let report = print_estimates(&list, &available);
    let verdict = match &available {
        Ok(a) => refusal(&list, a).map_or(Verdict::Fits, Verdict::Refused),
        Err(e) if e.contains(super::MEMORY_LIMIT_ENV) => Verdict::BadLimit(e.clone()),
        Err(_) => Verdict::Fits,
    };
    (report, verdict)
}

/// Why a run is refused: the first listed stage whose estimate exceeds what is available.
pub fn refusal(list: &[StageMemory], available: &Available) -> Option<String> {
    let s = list
        .iter()
        .find(|s| s.estimate.as_ref().is_ok_and(|e| e.total > available.bytes))?;
    let e = s.estimate.as_ref().ok()?;
    let mut advice = Vec::new();
    // What dominates decides what to lower first: a huge rank is not fixed by a smaller batch.
    if e.training_state > e.activations
        && let Some(key) = &s.size_key
    {
        let (name, now) = key.split_once(' ').unwrap_or((key, ""));
        advice.push(format!(
            "lower `{name}` {now}: the trained parameters and their optimiser state alone need {}",
            human_bytes(e.training_state)
        ));
    }
    advice.push(format!("lower `batch_size` (now {})", s.batch));
    if s.method.is_none() {
        advice.push("lower `vae_batch_size`".into());
        advice.push(format!(
            "lower `resolution` (now {}; activations grow with its square)",
            s.resolution
        ));
    } else {
        advice.push(format!(
            "lower the preprocess `resolution` (now {}; activations grow with its square)",
            s.resolution
        ));
    }
    if s.method == Some(Method::Dreambooth) {
        advice.push(
            "train with `method = \"lora\"` (full fine-tuning keeps a gradient and two AdamW \
             moments per UNet weight)"
                .into(),
        );
    }
    Some(format!(
        "stage `{}` needs about {} of memory on {} but {} is available ({}): {}; or pass \
         --no-memory-check to run anyway",
        s.stage,
        e.describe(),
        s.device,
        human_bytes(available.bytes),
        available.source,
        advice.join(", ")
    ))
}
