//! Writing a command's results to standard output without panicking.
//!
//! `println!` panics when stdout is closed (`sdpipe plan --json | head`) or full
//! (`sdpipe cache verify > /dev/full`). Results go through `control::stdout::print` (and the
//! [`out!`](crate::out)/[`outln!`](crate::outln) macros) instead: a closed pipe ends
//! the process quietly with exit 0, as `head` asked for no more (what ripgrep and coreutils do),
//! and any other write error (a full disk) is reported once, with exit code 3.

use std::io::{ErrorKind, Write};

use crate::exit::ExitCode;

/// What became of a failed write to stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdoutFailure {
    /// The reader went away (EPIPE): nothing more is wanted, exit 0 without a message.
    Closed,
    /// Anything else (ENOSPC, EIO): an environment failure, already reported on stderr.
    Failed,
}

impl StdoutFailure {
    /// The exit code the process ends with.
    pub fn exit_code(self) -> ExitCode {
        match self {
            StdoutFailure::Closed => ExitCode::Ok,
            StdoutFailure::Failed => ExitCode::Environment,
        }
    }
}

/// Writes `text` to `out` and flushes, classifying a failure; a non-pipe failure is reported on
/// stderr here, once.
pub fn write_to(out: &mut impl Write, text: &str) -> Result<(), StdoutFailure> {
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Err(StdoutFailure::Closed),
        Err(e) => {
            eprintln!("error: writing to standard output: {e}");
            Err(StdoutFailure::Failed)
        }
    }
}

/// Writes `text` to stdout; on failure ends the process as [`StdoutFailure`] says. Meant for the
/// command layer only, where nothing is left to clean up once results are being printed (locks
/// are released by the operating system, every cache write is already atomic).
pub fn print(text: &str) {
    if let Err(failure) = write_to(&mut std::io::stdout().lock(), text) {
        std::process::exit(failure.exit_code().code());
    }
}

/// `print!` through `control::stdout::print`: a closed pipe exits 0 quietly, a full disk exits 3.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::control::stdout::print(&format!($($arg)*))
    };
}

/// `println!` through `control::stdout::print`: a closed pipe exits 0 quietly, a full disk exits 3.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::control::stdout::print(&format!("{}\n", format_args!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Failing(ErrorKind);

    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from(self.0))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_pipe_is_a_quiet_success_and_a_full_disk_an_environment_error() {
        assert_eq!(
            write_to(&mut Failing(ErrorKind::BrokenPipe), "x"),
            Err(StdoutFailure::Closed)
        );
        assert_eq!(StdoutFailure::Closed.exit_code(), ExitCode::Ok);
        assert_eq!(
            write_to(&mut Failing(ErrorKind::StorageFull), "x"),
            Err(StdoutFailure::Failed)
        );
        assert_eq!(StdoutFailure::Failed.exit_code(), ExitCode::Environment);
        let mut buf = Vec::new();
        assert_eq!(write_to(&mut buf, "ok"), Ok(()));
        assert_eq!(buf, b"ok");
    }
}
