//! What a running job is told and what it tells: cancellation (Ctrl-C, `watch` cancelling a
//! stage whose key changed) and progress display. Below the stages and the engine, so both
//! use it without importing each other.

mod cancel;
pub mod error_chain;
mod progress;
pub mod stdout;

pub use cancel::{CancelToken, Cancelled, install_ctrlc_handler, interrupted};
pub use progress::Progress;
