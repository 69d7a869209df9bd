//! The integration tests, in one binary (one link instead of one per file): each module drives
//! the library or the real `sdpipe` binary on the fixtures. `tests/memory_probe.rs` stays alone
//! in its own binary because it reads process-wide memory figures.

mod base_model;
mod bench_cli;
mod cache_integrity;
mod caching;
mod common;
mod device_check;
mod encode_latents;
mod faults;
mod formats;
mod gradient_checkpointing;
mod memory_check;
mod merge_lora_parity;
mod merge_stage;
mod mixed_precision;
mod parity_embedding;
mod parity_lora;
mod parity_lora_training;
mod parity_models;
mod parity_optimizers;
mod parity_pipeline;
mod parity_schedulers;
mod parity_tokenizer;
mod pipeline_errors;
mod pretrain_stage;
mod quickstart_plan;
mod render;
mod report_stage;
mod robustness;
mod sample_cli;
mod sample_grid;
mod single_file_writer;
mod train_adapters;
mod train_bad_input;
mod train_dreambooth;
mod train_foundations;
mod train_hypernetwork;
mod train_lora;
mod train_matrix;
mod train_textual_inversion;
mod watch;
mod world;
