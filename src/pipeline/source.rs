//! The pipeline file being parsed: its text and path (every error points into them), and the
//! stage tables as read, before their parameters are parsed.

use std::ops::Range;
use std::path::Path;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::diagnostic::PipelineError;

/// The file being parsed (its parsing steps are in `parse`, `matrix` and `graph`).
pub(super) struct Parser<'a> {
    /// Where the text was read from (shown in errors, base of relative paths).
    pub path: &'a Path,
    /// The whole file.
    pub text: &'a str,
}

/// A stage table with `kind`, `needs` and `matrix` taken out.
pub(super) struct RawStage<'i> {
    pub name: Spanned<String>,
    pub kind: &'static str,
    pub needs: Vec<Spanned<String>>,
    pub needs_span: Option<Range<usize>>,
    pub matrix: Vec<MatrixAxis<'i>>,
    pub table: Spanned<DeTable<'i>>,
}

/// One `matrix.<param> = [ ... ]` list; nested tables give dotted params (`lora.rank`).
pub(super) struct MatrixAxis<'i> {
    pub param: String,
    pub key_span: Range<usize>,
    pub values: Vec<Spanned<DeValue<'i>>>,
}

impl Parser<'_> {
    /// An error at `span` of the file, with an optional fix.
    pub fn error(
        &self,
        span: Range<usize>,
        message: impl Into<String>,
        help: Option<String>,
    ) -> Box<PipelineError> {
        Box::new(PipelineError::at(self.path, self.text, span, message, help))
    }

    /// The span of dotted `field` inside `table`, or of the table header when absent.
    pub fn field_span(&self, table: &Spanned<DeTable<'_>>, field: &str) -> Range<usize> {
        let mut current = table.get_ref();
        let mut span = table.span();
        for part in field.split('.') {
            match current.get_key_value(part) {
                Some((key, value)) => {
                    span = key.span();
                    match value.get_ref() {
                        DeValue::Table(t) => current = t,
                        _ => break,
                    }
                }
                None => break,
            }
        }
        span
    }
}
