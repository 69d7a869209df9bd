//! The process exit codes of every command, defined once.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | a stage failed (the others that could finish did; the summary says which); `device-check`: a comparison exceeds its tolerance |
//! | 2 | usage error, or the pipeline file is invalid (the message points at the key) |
//! | 3 | the environment failed: cache or outputs not writable, I/O error (a full disk, stdout included), a model that cannot be read |
//! | 4 | refused before starting: a train stage's estimated peak memory exceeds what the device has (`--no-memory-check` overrides), or no GPU opens where one is needed |
//! | 130 | interrupted (Ctrl-C, SIGTERM or SIGHUP); finished stages are kept, nothing half-written remains |

/// What a command tells the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum ExitCode {
    /// Success.
    Ok = 0,
    /// A stage failed, or a `device-check` comparison is out of tolerance.
    Failed = 1,
    /// Usage error or invalid pipeline file.
    Usage = 2,
    /// The environment failed: I/O, a cache or outputs folder, a model that cannot be read.
    Environment = 3,
    /// The device cannot run it (memory estimate, or no GPU), refused before starting.
    Device = 4,
    /// Interrupted by Ctrl-C, SIGTERM or SIGHUP.
    Interrupted = 130,
}

impl ExitCode {
    /// The number the process exits with.
    pub fn code(self) -> i32 {
        self as i32
    }
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(code: ExitCode) -> Self {
        std::process::ExitCode::from(code.code() as u8)
    }
}
