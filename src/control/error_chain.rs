//! How an error is told to the user: its chain of causes on one line without repeats, and
//! whether it is the environment's fault (a full disk) rather than the stage's.

use std::error::Error;
use std::io::ErrorKind;

/// The error and its causes joined with `: `, skipping a cause whose text the message above it
/// already contains (libraries often repeat their source in their own message, which made a full
/// disk name the same path three times).
pub fn describe(error: &(dyn Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut last = out.clone();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() && !last.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        last = text;
        source = cause.source();
    }
    out
}

/// [`describe`] for an `anyhow::Error`.
pub fn describe_anyhow(error: &anyhow::Error) -> String {
    describe(error.as_ref())
}

/// Whether an I/O failure of the machine (no space, quota, read-only or forbidden file system)
/// is somewhere in the chain: such a failure is the environment's (exit code 3), not the
/// stage's (exit code 1), and rerunning once it is fixed resumes.
pub fn is_environment_failure(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                ErrorKind::StorageFull
                    | ErrorKind::QuotaExceeded
                    | ErrorKind::ReadOnlyFilesystem
                    | ErrorKind::PermissionDenied
                    | ErrorKind::FileTooLarge
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {source}")]
    struct Repeats {
        path: String,
        source: std::io::Error,
    }

    fn full() -> std::io::Error {
        std::io::Error::from(ErrorKind::StorageFull)
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let e = anyhow::Error::new(Repeats {
            path: "/c/x.safetensors".into(),
            source: full(),
        })
        .context("writing /c/x.safetensors");
        let text = describe_anyhow(&e);
        assert_eq!(text.matches("x.safetensors").count(), 2, "{text}");
        assert_eq!(text.matches(&full().to_string()).count(), 1, "{text}");
        // a cause that adds something is kept
        let e = anyhow::Error::new(full()).context("writing a.png");
        assert_eq!(describe_anyhow(&e), format!("writing a.png: {}", full()));
    }

    #[test]
    fn a_full_disk_is_the_environment_and_a_bad_value_is_not() {
        let e = anyhow::Error::new(Repeats {
            path: "x".into(),
            source: full(),
        })
        .context("stage");
        assert!(is_environment_failure(&e));
        let e = anyhow::Error::new(std::io::Error::from(ErrorKind::InvalidData)).context("x.png");
        assert!(!is_environment_failure(&e));
        assert!(!is_environment_failure(&anyhow::anyhow!(
            "lr must be finite"
        )));
    }
}
