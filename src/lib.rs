//! sdpipe: fine-tune Stable Diffusion from declarative, cached TOML pipelines.
//!
//! The pieces: [`pipeline`] (the TOML file → a DAG of stage instances), [`cache`] (blobs,
//! records, locks), [`engine`] (plan, run, watch), [`stages`] (what each kind does), [`image`]
//! (decoding and resizing), [`diffusion`] (the Stable Diffusion core on dfdx), [`render`]
//! (sample grids and PNG metadata), [`report`] (the method-comparison report), [`bench`](mod@bench) and
//! [`memory`] (speed and memory figures, the memory estimate of `plan`), [`cli`].

pub mod bench;
pub mod cache;
pub mod cli;
pub mod control;
pub mod device;
pub mod device_check;
pub mod diffusion;
pub mod engine;
pub mod exit;
pub mod formats;
pub mod image;
pub mod memory;
pub mod merge;
pub mod names;
pub mod pipeline;
pub mod render;
pub mod report;
pub mod sample;
pub mod settings;
pub mod stages;
pub mod train;
pub mod world;
