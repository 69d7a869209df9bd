//! `matrix`: one stage table expanded into the product of its parameter lists.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeString, DeTable, DeValue};

use super::diagnostic::PipelineError;
use super::source::{MatrixAxis, Parser, RawStage};

/// One point of the product.
pub(super) struct Point<'i> {
    /// `stage` or `stage@param=value,...`.
    pub name: String,
    /// (param, value as written) in declaration order.
    pub values: Vec<(String, String)>,
    /// The stage table with the point's values set.
    pub table: Spanned<DeTable<'i>>,
    /// Spans of the keys that came from the matrix (for "unknown parameter" errors).
    pub matrix_spans: Vec<Range<usize>>,
}

/// Reads the `matrix` table of a stage.
pub(super) fn axes<'i>(
    parser: &Parser<'_>,
    value: Spanned<DeValue<'i>>,
) -> Result<Vec<MatrixAxis<'i>>, Box<PipelineError>> {
    let span = value.span();
    let DeValue::Table(table) = value.into_inner() else {
        return Err(parser.error(
            span,
            "`matrix` must be a table of lists",
            Some("write e.g. `matrix.method = [\"lora\", \"dreambooth\"]`".into()),
        ));
    };
    let mut out = Vec::new();
    collect(parser, "", table, &mut out)?;
    if out.is_empty() {
        return Err(parser.error(
            span,
            "`matrix` is empty",
            Some("remove it, or add `matrix.PARAM = [values]`".into()),
        ));
    }
    Ok(out)
}

fn collect<'i>(
    parser: &Parser<'_>,
    prefix: &str,
    table: DeTable<'i>,
    out: &mut Vec<MatrixAxis<'i>>,
) -> Result<(), Box<PipelineError>> {
    for (key, value) in table {
        let param = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        let value_span = value.span();
        match value.into_inner() {
            DeValue::Table(t) => collect(parser, &param, t, out)?,
            DeValue::Array(items) => {
                if items.is_empty() {
                    return Err(parser.error(
                        value_span,
                        format!("matrix list `{param}` is empty"),
                        Some("give at least one value, or remove it".into()),
                    ));
                }
                out.push(MatrixAxis {
                    param,
                    key_span: key.span(),
                    values: items.iter().cloned().collect(),
                });
            }
            _ => {
                return Err(parser.error(
                    value_span,
                    format!("matrix entry `{param}` must be a list of values"),
                    Some(format!("write `matrix.{param} = [a, b]`")),
                ));
            }
        }
    }
    Ok(())
}

/// Expands a stage into its matrix points (one point, named after the stage, without a matrix).
pub(super) fn expand<'i>(
    parser: &Parser<'_>,
    stage: &RawStage<'i>,
) -> Result<Vec<Point<'i>>, Box<PipelineError>> {
    let base = stage.name.get_ref();
    let mut points = vec![Point {
        name: base.clone(),
        values: Vec::new(),
        table: stage.table.clone(),
        matrix_spans: Vec::new(),
    }];
    for axis in &stage.matrix {
        if parser.field_span(&stage.table, &axis.param) != stage.table.span()
            && has_path(stage.table.get_ref(), &axis.param)
        {
            return Err(parser.error(
                axis.key_span.clone(),
                format!(
                    "[stage.{base}] `{}` is set both in the stage and in its matrix",
                    axis.param
                ),
                Some("keep one of the two".into()),
            ));
        }
        let mut next = Vec::new();
        for point in &points {
            for value in &axis.values {
                let mut table = point.table.clone();
                set_path(
                    table.get_mut(),
                    &axis.param,
                    axis.key_span.clone(),
                    value.clone(),
                );
                let mut values = point.values.clone();
                values.push((axis.param.clone(), display_value(parser.text, value)));
                let mut matrix_spans = point.matrix_spans.clone();
                matrix_spans.push(axis.key_span.clone());
                next.push(Point {
                    name: String::new(),
                    values,
                    table,
                    matrix_spans,
                });
            }
        }
        points = next;
    }
    if !stage.matrix.is_empty() {
        for point in &mut points {
            let parts: Vec<String> = point
                .values
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            point.name = format!("{base}@{}", parts.join(","));
        }
    }
    Ok(points)
}

fn has_path(table: &DeTable<'_>, path: &str) -> bool {
    let mut current = table;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        match current.get(*part).map(Spanned::get_ref) {
            Some(DeValue::Table(t)) if i + 1 < parts.len() => current = t,
            Some(_) => return i + 1 == parts.len(),
            None => return false,
        }
    }
    false
}

fn set_path<'i>(
    table: &mut DeTable<'i>,
    path: &str,
    span: Range<usize>,
    value: Spanned<DeValue<'i>>,
) {
    match path.split_once('.') {
        None => {
            table.insert(Spanned::new(span, DeString::Owned(path.to_string())), value);
        }
        Some((head, rest)) => {
            let key = Spanned::new(span.clone(), DeString::Owned(head.to_string()));
            let entry = table
                .entry(key)
                .or_insert_with(|| Spanned::new(span.clone(), DeValue::Table(DeTable::new())));
            if !matches!(entry.get_ref(), DeValue::Table(_)) {
                *entry = Spanned::new(span.clone(), DeValue::Table(DeTable::new()));
            }
            if let DeValue::Table(inner) = entry.get_mut() {
                set_path(inner, rest, span, value);
            }
        }
    }
}

/// A matrix value as it reads in an instance name: strings bare, anything else as written.
fn display_value(text: &str, value: &Spanned<DeValue<'_>>) -> String {
    match value.get_ref() {
        DeValue::String(s) => s.to_string(),
        _ => text
            .get(value.span())
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| "?".into()),
    }
}
