//! Errors in a pipeline file, pointing at the offending key with file, line and column.

use std::ops::Range;
use std::path::{Path, PathBuf};

use miette::{Diagnostic, NamedSource, SourceSpan};
use thiserror::Error;

/// An error in a pipeline file: what is wrong, where (file:line:column) and how to fix it.
///
/// Rendered by miette with the offending line underlined; the first line of the message
/// always starts with `FILE:LINE:COL` so that plain-text consumers (CI logs, editors) can jump
/// to it.
#[derive(Debug, Error, Diagnostic)]
#[error("{location}: {message}")]
pub struct PipelineError {
    /// `path:line:column` of the offending key or value.
    pub location: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    #[help]
    pub help: Option<String>,
    #[source_code]
    src: NamedSource<String>,
    #[label("{label}")]
    span: SourceSpan,
    label: String,
    /// 1-based line of the offending key.
    pub line: usize,
    /// 1-based column of the offending key.
    pub column: usize,
}

impl PipelineError {
    /// An error at `span` (byte range) of `text`, the contents of the file at `path`.
    pub fn at(
        path: &Path,
        text: &str,
        span: Range<usize>,
        message: impl Into<String>,
        help: Option<String>,
    ) -> Self {
        let start = span.start.min(text.len());
        let end = span.end.clamp(start, text.len());
        let (line, column) = line_col(text, start);
        let message = message.into();
        PipelineError {
            location: format!("{}:{line}:{column}", path.display()),
            label: short_label(&message),
            message,
            help,
            src: NamedSource::new(path.display().to_string(), text.to_string()),
            span: (start, end - start).into(),
            line,
            column,
        }
    }
}

fn short_label(message: &str) -> String {
    let first = message.lines().next().unwrap_or(message);
    if first.chars().count() > 60 {
        "here".to_string()
    } else {
        first.to_string()
    }
}

/// 1-based (line, column) of byte offset `at` in `text`; columns count characters.
pub fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..floor_char_boundary(text, at)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// A file that could not be read at all (not a syntax error: there is no position to show).
#[derive(Debug, Error, Diagnostic)]
#[error("cannot read pipeline file {path}: {source}")]
pub struct ReadError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        // 'é' is two bytes but one column.
        assert_eq!(line_col(text, 9), (2, 3));
    }
}
