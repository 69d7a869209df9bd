//! sdpipe: fine-tune Stable Diffusion from declarative, cached TOML pipelines.
//!
//! Most users run the `sdpipe` binary ([`cli`]); this library is what it is made of. The
//! modules are layered, each importing only from the ones below it (the module graph and a
//! paragraph per layer are in `docs/architecture.md`).
//!
//! # Public API
//!
//! What a program or a test may use; everything else is `pub(crate)` and may change freely.
//!
//! - [`diffusion`]: the Stable Diffusion core on dfdx: open a checkpoint
//!   ([`diffusion::checkpoint::Checkpoint`], diffusers folder or single file), its models
//!   ([`diffusion::checkpoint::StableDiffusion`]: text encoders, UNet, VAE), the tokenizer, the
//!   schedulers and text-to-image ([`diffusion::text_to_image::TextToImage`]).
//! - [`formats`]: the files users exchange, read and written: kohya LoRA/LoCon, embeddings
//!   (A1111 and diffusers), A1111 hypernetworks, single-file checkpoints, safetensors, and
//!   PyTorch pickles read without Python.
//! - [`train`]: the training library: adapters (`train::lora`), optimisers, learning-rate
//!   schedules, the objective and the one step every method runs.
//! - [`merge`]: LoRA into checkpoint, LoRA combination, SVD extraction, weighted sums.
//! - [`render`]: grids and PNG `parameters` (A1111 infotext) in and out.
//! - [`pipeline`]: parse a pipeline file into stage instances ([`pipeline::parse`]), with errors
//!   that point at `file:line:column`; [`stages`]: each kind's parameters and what it does.
//! - [`memory`]: the peak-memory estimate `plan` prints and the probe that measures it;
//!   [`device`]: which compute device a run uses; [`world`]: the synthetic datasets and base
//!   scenes the pretrain stage and the tests draw.
//! - [`cli`]: the command line ([`cli::Cli`], [`cli::run`]), as the binary calls it, and
//!   [`exit`]: its documented exit codes.
//!
//! Inside the crate: the cache (content-addressed blobs, records, locks), the engine (plan,
//! run, watch), image decoding and buckets, `comparison` (the page the `report` stage renders),
//! `sample`, `bench`, the device check and settings.

pub(crate) mod bench;
pub(crate) mod cache;
pub mod cli;
pub(crate) mod comparison;
pub(crate) mod control;
pub mod device;
pub(crate) mod device_check;
pub mod diffusion;
pub(crate) mod engine;
pub mod exit;
pub mod formats;
pub(crate) mod image;
pub mod memory;
pub mod merge;
pub(crate) mod names;
pub mod pipeline;
pub mod render;
pub(crate) mod sample;
pub(crate) mod settings;
pub mod stages;
pub mod train;
pub mod world;
