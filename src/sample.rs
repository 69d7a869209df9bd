//! `sdpipe sample`: one-off text-to-image generation.
//!
//! ```text
//! sdpipe sample --model PATH --prompt TEXT [--negative TEXT] [--steps N]
//!               [--sampler ddim|euler|euler_a] [--cfg F] [--seed N] [--width W --height H]
//!               [--batch N] [--clip-skip N] [--config DIR] [--init-latents FILE]
//!               --out FILE.png [--out-tensor FILE] [--device auto|cpu|cuda:N]
//! ```
//!
//! * `--model`: a diffusers folder or a single-file SD 1.x checkpoint; `--config DIR` takes the
//!   model configs, tokenizer and scheduler config from a diffusers folder (for single files
//!   whose architecture the shapes cannot tell, as diffusers' `from_single_file(config=…)`).
//! * Defaults: 20 steps, `euler_a`, CFG 7.5, seed 0, size = the UNet's `sample_size` × the
//!   VAE's downsampling factor (512×512 for SD 1.5), batch 1, clip skip 0.
//! * `--clip-skip N` counts as diffusers does (0 = last layer, 1 = penultimate); the PNG records
//!   it in A1111's numbering (`Clip skip: N+1`).
//! * `--init-latents FILE`: a safetensors file with tensor `latents`, `[b, 4, H/f, W/f]` (f =
//!   the VAE's downsampling factor), meaning exactly diffusers' `latents` argument: unit-variance
//!   noise, multiplied here by the sampler's `init_noise_sigma`. Without `--width/--height` the
//!   size is taken from it.
//! * `--out FILE.png`: image 0 is written to `FILE.png`, image `i` of a `--batch` to
//!   `FILE-i.png` (`out.png`, `out-1.png`, `out-2.png`, …), each with an A1111 `parameters`
//!   text chunk (prompt, negative prompt, steps, sampler, CFG scale, the image's own seed
//!   `seed + i`, size, model hash = the first 10 hex digits of the SHA-256 of the model file,
//!   or of the UNet weights file for a diffusers folder, model name).
//! * `--out-tensor FILE`: a safetensors file with tensor `image`, f32 `[b, 3, H, W]` in [0, 1]
//!   (diffusers' `output_type="pt"`), its metadata `parameters` holding image 0's text.
//!
//! Exit codes: 0 success, 2 bad usage or input (an option out of range, a size not a multiple
//! of 8 or of the model's downsampling, a missing or invalid model or latents file), 3 an I/O
//! failure while reading or writing.

use crate::exit::ExitCode;
use std::io::Read;
use std::path::{Path, PathBuf};

use clap::Args;
use dfdx::prelude::*;
use sha2::{Digest, Sha256};

use crate::diffusion::error::DiffusionError;
use crate::diffusion::schedulers::{SamplerKind, SchedulerConfig};
use crate::diffusion::text_to_image::{TextToImage, TextToImageError, TextToImageOptions};
use crate::diffusion::{
    checkpoint::{Checkpoint, CheckpointLayout},
    nn::weights::SafetensorsFile,
};
use crate::render::png_meta::{GenerationParameters, write_atomic, write_png_with_parameters};
use crate::render::rgb_image_from_chw;

/// Options of `sdpipe sample` (see the module documentation for the contract).
#[derive(Debug, Clone, Args)]
pub struct SampleArgs {
    /// The model: a diffusers folder or a single-file SD 1.x checkpoint (.safetensors).
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// The prompt.
    #[arg(long, value_name = "TEXT")]
    pub prompt: String,
    /// The negative prompt.
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub negative: String,
    /// Sampling steps.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub steps: usize,
    /// Sampler: ddim, euler or euler_a.
    #[arg(long, value_name = "NAME", default_value = "euler_a", value_parser = parse_sampler)]
    pub sampler: SamplerKind,
    /// Classifier-free guidance scale (≤ 1 disables guidance).
    #[arg(long, value_name = "F", default_value_t = 7.5)]
    pub cfg: f32,
    /// Seed of the first image; image i of a batch uses seed + i.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
    /// Image width in pixels (a multiple of 8; default: the model's native size).
    #[arg(long, value_name = "W")]
    pub width: Option<usize>,
    /// Image height in pixels (a multiple of 8; default: the model's native size).
    #[arg(long, value_name = "H")]
    pub height: Option<usize>,
    /// Number of images; image i goes to FILE-i.png (image 0 to FILE.png).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub batch: usize,
    /// Text-encoder layers to skip from the end (diffusers' counting: 1 = penultimate layer,
    /// A1111's "Clip skip 2").
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub clip_skip: usize,
    /// A diffusers folder to take the model configs, tokenizer and scheduler config from.
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// A diffusers `scheduler_config.json` to sample with instead of the model's: the one a
    /// `train` stage writes beside a variant trained with another `prediction_type` or zero
    /// terminal SNR.
    #[arg(long, value_name = "FILE")]
    pub scheduler_config: Option<PathBuf>,
    /// Initial latents: a safetensors file with tensor `latents` [b, 4, H/f, W/f] (diffusers'
    /// `latents` argument).
    #[arg(long, value_name = "FILE")]
    pub init_latents: Option<PathBuf>,
    /// Output PNG (with an A1111 `parameters` chunk).
    #[arg(long, value_name = "FILE.png")]
    pub out: PathBuf,
    /// A LoRA to apply (kohya, diffusers or PEFT format), merged at WEIGHT (default 1);
    /// repeatable, effects add up.
    #[arg(long, value_name = "FILE[:WEIGHT]", value_parser = parse_lora_arg)]
    pub lora: Vec<(PathBuf, f32)>,
    /// A textual-inversion embedding (A1111/kohya `emb_params`, diffusers `{token: tensor}`, or
    /// A1111 `.pt`); the prompt uses it by TOKEN, which defaults to the file stem as in A1111.
    /// Repeatable.
    #[arg(long, value_name = "FILE[:TOKEN]")]
    pub embedding: Vec<String>,
    /// An A1111 hypernetwork (`.pt`, or its safetensors twin) applied at MULTIPLIER (default:
    /// one) to the keys' and values' context of the attentions of its widths; repeatable,
    /// applied in order as A1111 stacks them.
    #[arg(long, value_name = "FILE[:MULTIPLIER]", value_parser = parse_lora_arg)]
    pub hypernetwork: Vec<(PathBuf, f32)>,
    /// Also write the images as a safetensors file with tensor `image` [b, 3, H, W] in [0, 1].
    #[arg(long, value_name = "FILE")]
    pub out_tensor: Option<PathBuf>,
    /// Where the models run: auto (the GPU when this build has CUDA and one is present), cpu
    /// or cuda:N.
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    pub device: crate::device::DeviceChoice,
    /// What the UNet computes in: f32, or f16 (mixed precision: f16 storage, f32 arithmetic
    /// inside each op; for the GPU). The text encoder and the VAE compute in f32.
    #[arg(long, value_name = "PRECISION", default_value = "f32", value_parser = parse_precision)]
    pub precision: crate::device::Precision,
}

fn parse_precision(s: &str) -> Result<crate::device::Precision, String> {
    match s {
        "f32" => Ok(crate::device::Precision::F32),
        "f16" => Ok(crate::device::Precision::F16),
        "bf16" => Err("bf16 is not available (dfdx 0.13 has no bfloat16 kernels); use f16".into()),
        other => Err(format!("unknown precision `{other}`: use f32 or f16")),
    }
}

fn parse_sampler(s: &str) -> Result<SamplerKind, String> {
    s.parse::<SamplerKind>().map_err(|e| e.to_string())
}

/// A failure of the command: its exit code and message.
#[derive(Debug)]
struct Failure {
    code: ExitCode,
    message: String,
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: ExitCode::Usage,
        message: message.into(),
    }
}

fn io_failure(message: impl Into<String>) -> Failure {
    Failure {
        code: ExitCode::Environment,
        message: message.into(),
    }
}

/// Exit code of a model-loading error: a file that cannot be read for another reason than
/// not existing is an I/O failure, everything else (missing files, bad tensors, unsupported
/// architectures) is bad input.
fn model_failure(context: &str, e: &DiffusionError) -> Failure {
    let code = match e {
        DiffusionError::Io { source, .. } if source.kind() != std::io::ErrorKind::NotFound => {
            ExitCode::Environment
        }
        _ => ExitCode::Usage,
    };
    Failure {
        code,
        message: format!("{context}: {e}"),
    }
}

/// The command-line flag of a [`TextToImageError::InvalidOption`] field.
fn flag_of(option: &str) -> &'static str {
    match option {
        "width" => "--width",
        "height" => "--height",
        "steps" => "--steps",
        "cfg_scale" => "--cfg",
        "batch" => "--batch",
        "clip_skip" => "--clip-skip",
        "init_latents" => "--init-latents",
        _ => "an option",
    }
}

fn pipeline_failure(e: TextToImageError) -> Failure {
    match e {
        TextToImageError::InvalidOption { option, reason } => {
            usage(format!("{} {reason}", flag_of(option)))
        }
        TextToImageError::Model(m) => model_failure("model", &m),
        other => usage(other.to_string()),
    }
}

/// Runs `sdpipe sample`, with a progress bar on a terminal unless `quiet` (the global
/// `--quiet`); returns the exit code (0 ok, 2 usage / bad input, 3 I/O).
pub fn run_with(args: SampleArgs, quiet: bool) -> ExitCode {
    match execute(&args, quiet) {
        Ok(written) => {
            for path in written {
                crate::outln!("wrote {}", path.display());
            }
            ExitCode::Ok
        }
        Err(f) => {
            eprintln!("error: {}", f.message);
            f.code
        }
    }
}

/// Checks what needs no model.
fn check_args(args: &SampleArgs) -> Result<(), Failure> {
    for (flag, v) in [("--width", args.width), ("--height", args.height)] {
        if let Some(v) = v
            && (v == 0 || v % 8 != 0)
        {
            return Err(usage(format!("{flag} {v} is not a positive multiple of 8")));
        }
    }
    if args.steps == 0 {
        return Err(usage("--steps must be at least 1"));
    }
    if args.batch == 0 {
        return Err(usage("--batch must be at least 1"));
    }
    if !args.cfg.is_finite() {
        return Err(usage(format!("--cfg {} is not a finite number", args.cfg)));
    }
    if args.out.file_name().is_none() || args.out.as_os_str().is_empty() {
        return Err(usage(format!(
            "--out {} is not a file name",
            args.out.display()
        )));
    }
    if !args.model.exists() {
        return Err(usage(format!(
            "--model {}: no such file or folder",
            args.model.display()
        )));
    }
    if let Some(dir) = &args.config
        && !dir.is_dir()
    {
        return Err(usage(format!(
            "--config {}: not a folder (expected a diffusers model folder)",
            dir.display()
        )));
    }
    if let Some(file) = &args.init_latents
        && !file.is_file()
    {
        return Err(usage(format!(
            "--init-latents {}: no such file",
            file.display()
        )));
    }
    Ok(())
}

/// Reads `--init-latents`: tensor `latents`, 4-D.
fn read_init_latents(path: &Path) -> Result<(Vec<f32>, [usize; 4]), Failure> {
    let context = format!("--init-latents {}", path.display());
    let file = SafetensorsFile::open(path).map_err(|e| model_failure(&context, &e))?;
    let (data, shape) = file
        .read_f32("latents")
        .map_err(|e| model_failure(&context, &e))?;
    match shape.as_slice() {
        &[b, c, h, w] => Ok((data, [b, c, h, w])),
        other => Err(usage(format!(
            "{context}: tensor `latents` has shape {other:?}, expected [b, 4, H/f, W/f]"
        ))),
    }
}

/// The file whose SHA-256 is the model hash: the checkpoint file, or the UNet weights of a
/// diffusers folder (`unet/diffusion_pytorch_model[.fp16].safetensors`, or the shard index).
fn hashed_model_file(ckpt: &Checkpoint) -> Option<PathBuf> {
    match ckpt.layout {
        CheckpointLayout::SingleFile => Some(ckpt.path.clone()),
        CheckpointLayout::Diffusers => [
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.safetensors.index.json",
        ]
        .iter()
        .map(|name| ckpt.path.join("unet").join(name))
        .find(|p| p.is_file()),
    }
}

/// A1111's short model hash: the first 10 hex digits of the file's SHA-256.
pub fn short_model_hash(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let digest = hasher.finalize();
    Ok(digest.iter().take(5).map(|b| format!("{b:02x}")).collect())
}

/// The model's name as A1111 shows it: the checkpoint file's stem, or the folder's name.
fn model_name(path: &Path) -> Option<String> {
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    name.map(|n| n.to_string_lossy().into_owned())
}

/// Output path of image `i`: `FILE.png` for 0, `FILE-i.png` after.
pub fn numbered_output(out: &Path, i: usize) -> PathBuf {
    if i == 0 {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    out.with_file_name(format!("{stem}-{i}.{ext}"))
}

fn ensure_parent(path: &Path) -> Result<(), Failure> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| io_failure(format!("cannot create {}: {e}", dir.display())))?;
    }
    Ok(())
}

fn execute(args: &SampleArgs, quiet: bool) -> Result<Vec<PathBuf>, Failure> {
    check_args(args)?;
    let rt = crate::device::open(args.device).map_err(|e| match e {
        crate::device::DeviceError::NoCudaSupport(_) => usage(format!("--device: {e}")),
        other => io_failure(format!("--device: {other}")),
    })?;
    let context = format!("--model {}", args.model.display());
    let mut ckpt = Checkpoint::open(&args.model).map_err(|e| model_failure(&context, &e))?;
    if let Some(dir) = &args.config {
        ckpt = ckpt
            .with_configs_from(dir)
            .map_err(|e| model_failure(&format!("--config {}", dir.display()), &e))?;
    }
    let f = ckpt.vae_config.downsampling_factor();

    let init = match &args.init_latents {
        Some(path) => Some(read_init_latents(path)?),
        None => None,
    };
    let (mut width, mut height) = (args.width, args.height);
    if let Some((_, [b, _, h, w])) = &init {
        width = width.or(Some(w * f));
        height = height.or(Some(h * f));
        if *b != args.batch {
            return Err(usage(format!(
                "--init-latents {}: holds {b} latent(s) but --batch is {}",
                args.init_latents
                    .as_deref()
                    .unwrap_or(Path::new(""))
                    .display(),
                args.batch
            )));
        }
    }

    let size = (width, height);
    crate::on_device_precision!(rt, args.precision, dev, E => {
        generate_on::<E, _>(args, quiet, &ckpt, &context, init, size, &dev)
    })
}

/// The rest of [`execute`] on the chosen device: load, generate, write.
fn generate_on<E: crate::diffusion::nn::Elem, D: Device<f32> + Device<E>>(
    args: &SampleArgs,
    quiet: bool,
    ckpt: &Checkpoint,
    context: &str,
    init: Option<(Vec<f32>, [usize; 4])>,
    (width, height): (Option<usize>, Option<usize>),
    dev: &D,
) -> Result<Vec<PathBuf>, Failure> {
    let mut pipe: TextToImage<D, E> = TextToImage::load_as(ckpt, args.config.as_deref(), dev)
        .map_err(|e| match e {
            TextToImageError::Model(m) => model_failure(context, &m),
            other => usage(format!("{context}: {other}")),
        })?;
    if let Some(file) = &args.scheduler_config {
        pipe.scheduler_config = SchedulerConfig::from_json_file(file)
            .map_err(|e| usage(format!("--scheduler-config: {e}")))?;
    }
    for spec in &args.embedding {
        let (file, token) = match spec.rsplit_once(':') {
            Some((f, t)) if !t.is_empty() && !t.contains('/') && !t.contains('\\') => {
                (PathBuf::from(f), Some(t))
            }
            _ => (PathBuf::from(spec), None),
        };
        let (embedding, _) = crate::formats::embedding::read_embedding(&file, token)
            .map_err(|e| usage(format!("--embedding {}: {e}", file.display())))?;
        pipe.add_embedding(&embedding.token, &embedding.vectors.data)
            .map_err(|e| usage(format!("--embedding {}: {e}", file.display())))?;
    }
    let mut lora_hashes = Vec::new();
    for (path, weight) in &args.lora {
        let (network, _) = crate::formats::lora::read_lora(path, None)
            .map_err(|e| usage(format!("--lora {}: {e}", path.display())))?;
        crate::train::lora::merge_into_unet(&mut pipe.models.unet, &network, *weight)
            .and_then(|()| {
                crate::train::lora::merge_into_unet(
                    pipe.models.text_encoder_mut(),
                    &network,
                    *weight,
                )
            })
            .map_err(|e| usage(format!("--lora {}: {e}", path.display())))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let hash = short_model_hash(path).unwrap_or_default();
        lora_hashes.push(format!("{name}: {hash}"));
    }
    let mut hypernets = Vec::new();
    let mut hypernet_names = Vec::new();
    for (path, multiplier) in &args.hypernetwork {
        let file = crate::formats::hypernetwork::read_hypernetwork(path)
            .map_err(|e| usage(format!("--hypernetwork {}: {e}", path.display())))?;
        let net = crate::train::hypernetwork::HyperNet::from_host(&file, dev)
            .map_err(|e| usage(format!("--hypernetwork {}: {e}", path.display())))?;
        hypernet_names.push(format!(
            "{}: {}",
            file.name,
            short_model_hash(path).unwrap_or_default()
        ));
        hypernets.push((net, *multiplier));
    }
    if !hypernets.is_empty() {
        let stack: Vec<_> = hypernets.iter().map(|(n, m)| (n, *m)).collect();
        crate::train::hypernetwork::install(&mut pipe.models.unet, &stack, None).map_err(|e| {
            let files: Vec<String> = args
                .hypernetwork
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect();
            usage(format!("--hypernetwork {}: {e}", files.join(", ")))
        })?;
    }
    let options = TextToImageOptions {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative.clone(),
        width,
        height,
        steps: args.steps,
        sampler: args.sampler,
        cfg_scale: args.cfg,
        batch: args.batch,
        seed: args.seed,
        clip_skip: args.clip_skip,
    };
    pipe.check_options(&options).map_err(pipeline_failure)?;
    let init = init.map(|(data, [b, c, h, w])| dev.tensor_from_vec(data, (b, c, h, w)));

    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(args.steps as u64)
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {pos}/{len} steps ({elapsed}, eta {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("sampling ({})", args.sampler));
    let generation = pipe
        .generate(&options, init, &mut |p| bar.set_position(p.step as u64 + 1))
        .map_err(pipeline_failure);
    bar.finish_and_clear();
    let generation = generation?;
    let s = &generation.settings;

    let model_hash =
        match hashed_model_file(ckpt) {
            Some(file) => Some(short_model_hash(&file).map_err(|e| {
                io_failure(format!("cannot hash model file {}: {e}", file.display()))
            })?),
            None => None,
        };
    let params_for = |i: usize| {
        let mut extra = Vec::new();
        if !lora_hashes.is_empty() {
            extra.push((
                "Lora hashes".to_string(),
                format!("\"{}\"", lora_hashes.join(", ")),
            ));
        }
        if !hypernet_names.is_empty() {
            extra.push((
                "Hypernet hashes".to_string(),
                format!("\"{}\"", hypernet_names.join(", ")),
            ));
            let strengths: Vec<String> = args
                .hypernetwork
                .iter()
                .map(|(_, m)| m.to_string())
                .collect();
            extra.push(("Hypernet strength".to_string(), strengths.join(", ")));
        }
        if s.clip_skip > 0 {
            extra.push(("Clip skip".to_string(), (s.clip_skip + 1).to_string()));
        }
        if s.batch > 1 {
            extra.push(("Batch size".to_string(), s.batch.to_string()));
            extra.push(("Batch pos".to_string(), i.to_string()));
        }
        GenerationParameters {
            prompt: s.prompt.clone(),
            negative_prompt: s.negative_prompt.clone(),
            steps: s.steps as u32,
            sampler: s.sampler.a1111_name().to_string(),
            cfg_scale: s.cfg_scale,
            seed: s.seeds[i],
            width: s.width as u32,
            height: s.height as u32,
            model_hash: model_hash.clone(),
            model: model_name(&ckpt.path),
            extra,
        }
    };

    let mut written = Vec::new();
    ensure_parent(&args.out)?;
    for i in 0..s.batch {
        let path = numbered_output(&args.out, i);
        let data = generation
            .image_chw(i)
            .ok_or_else(|| io_failure(format!("image {i} missing from the generation")))?;
        let (_, _, h, w) = *generation.images.shape();
        let image = rgb_image_from_chw(&data, h as u32, w as u32)
            .map_err(|e| io_failure(format!("{}: {e}", path.display())))?;
        write_png_with_parameters(&path, &image, &params_for(i))
            .map_err(|e| io_failure(format!("cannot write {}: {e}", path.display())))?;
        written.push(path);
    }

    if let Some(path) = &args.out_tensor {
        ensure_parent(path)?;
        let (b, c, h, w) = *generation.images.shape();
        let bytes: Vec<u8> = generation
            .images
            .as_vec()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![b, c, h, w], &bytes)
                .map_err(|e| io_failure(format!("{}: {e}", path.display())))?;
        let metadata = std::collections::HashMap::from([(
            "parameters".to_string(),
            params_for(0).to_infotext(),
        )]);
        let file = safetensors::serialize([("image", view)], Some(metadata))
            .map_err(|e| io_failure(format!("{}: {e}", path.display())))?;
        write_atomic(path, &file)
            .map_err(|e| io_failure(format!("cannot write {}: {e}", path.display())))?;
        written.push(path.clone());
    }
    Ok(written)
}

/// `FILE[:WEIGHT]` of `--lora` (the weight after the last `:` when it parses as a number).
fn parse_lora_arg(text: &str) -> Result<(PathBuf, f32), String> {
    if let Some((file, weight)) = text.rsplit_once(':')
        && let Ok(w) = weight.parse::<f32>()
    {
        if !w.is_finite() {
            return Err(format!("weight `{weight}` is not a finite number"));
        }
        return Ok((PathBuf::from(file), w));
    }
    Ok((PathBuf::from(text), 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_outputs() {
        let out = Path::new("dir/cat.png");
        assert_eq!(numbered_output(out, 0), PathBuf::from("dir/cat.png"));
        assert_eq!(numbered_output(out, 1), PathBuf::from("dir/cat-1.png"));
        assert_eq!(numbered_output(out, 12), PathBuf::from("dir/cat-12.png"));
        assert_eq!(
            numbered_output(Path::new("cat"), 2),
            PathBuf::from("cat-2.png")
        );
    }

    #[test]
    fn flags_name_every_option() {
        for option in [
            "width",
            "height",
            "steps",
            "cfg_scale",
            "batch",
            "clip_skip",
            "init_latents",
        ] {
            assert!(flag_of(option).starts_with("--"), "{option}");
        }
    }
}
