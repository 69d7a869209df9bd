//! Cancellation: per-run and per-stage tokens (watch cancels a stage whose key changed) and
//! Ctrl-C.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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
///
/// Stages check it at every item or step boundary, their yield points. A token may also carry a
/// pause taken at each of them ([`CancelToken::with_pause`]): the kill, watch and concurrency
/// tests widen the window in which they interrupt a stage that way, without a test hook in the
/// stages' loops.
#[derive(Debug, Clone, Default)]
pub struct CancelToken {
    own: Arc<AtomicBool>,
    parent: Option<Arc<AtomicBool>>,
    pause: Option<Duration>,
}

impl CancelToken {
    /// A fresh, unset token.
    pub fn new() -> Self {
        Self::default()
    }

    /// A token cancelled by itself or by `self`, pausing as `self` does.
    pub fn child(&self) -> CancelToken {
        CancelToken {
            own: Arc::new(AtomicBool::new(false)),
            parent: Some(self.own.clone()),
            pause: self.pause,
        }
    }

    /// The same token, waiting `pause` at each [`CancelToken::check`] before it answers.
    pub fn with_pause(mut self, pause: Option<Duration>) -> CancelToken {
        self.pause = pause;
        self
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
    /// Fails with [`Cancelled`] if the work should stop (after the token's pause, if any).
    pub fn check(&self) -> Result<(), Cancelled> {
        if let Some(pause) = self.pause {
            std::thread::sleep(pause);
        }
        if self.is_cancelled() {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_are_cancelled_by_their_parent_and_keep_its_pause() {
        let run = CancelToken::new().with_pause(Some(Duration::from_millis(20)));
        let stage = run.child();
        let started = std::time::Instant::now();
        assert!(stage.check().is_ok());
        assert!(started.elapsed() >= Duration::from_millis(20), "no pause");
        run.cancel();
        assert!(stage.check().is_err());
        assert!(CancelToken::new().child().check().is_ok());
    }
}
