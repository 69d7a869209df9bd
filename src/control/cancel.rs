//! Cancellation: per-run and per-stage tokens (watch cancels a stage whose key changed) and
//! Ctrl-C.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether Ctrl-C (SIGINT), SIGTERM or SIGHUP was received.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Makes Ctrl-C ask running stages to stop at their next check instead of killing the process
/// mid-write; a second Ctrl-C exits at once (writes are atomic, so that is safe too). SIGTERM
/// (what Slurm, systemd and `docker stop` send) and SIGHUP (a closed terminal) act the same,
/// through `ctrlc`'s `termination` feature: the run stops, prints its summary and exits 130.
pub fn install_ctrlc_handler() {
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            std::process::exit(crate::exit::ExitCode::Interrupted.code());
        }
        eprintln!("\ninterrupted: stopping after the current step (Ctrl-C again to quit now)");
    });
}

/// A flag a stage polls to know it should stop; a child is also cancelled by its parent.
#[derive(Debug, Clone, Default)]
pub struct CancelToken {
    own: Arc<AtomicBool>,
    parent: Option<Arc<AtomicBool>>,
}

impl CancelToken {
    /// A fresh, unset token.
    pub fn new() -> Self {
        Self::default()
    }

    /// A token cancelled by itself or by `self`.
    pub fn child(&self) -> CancelToken {
        CancelToken {
            own: Arc::new(AtomicBool::new(false)),
            parent: Some(self.own.clone()),
        }
    }

    /// Asks the holder to stop.
    pub fn cancel(&self) {
        self.own.store(true, Ordering::SeqCst);
    }

    /// Whether this token (or its parent) was cancelled, or Ctrl-C was pressed.
    pub fn is_cancelled(&self) -> bool {
        self.own.load(Ordering::SeqCst)
            || self
                .parent
                .as_ref()
                .is_some_and(|p| p.load(Ordering::SeqCst))
            || interrupted()
    }
}

/// Returned (inside `anyhow::Error`) by work that stopped because it was cancelled.
#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

impl CancelToken {
    /// Fails with [`Cancelled`] if the work should stop.
    pub fn check(&self) -> Result<(), Cancelled> {
        if self.is_cancelled() {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }
}
