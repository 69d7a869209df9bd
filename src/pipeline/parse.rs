//! TOML text → [`Pipeline`], keeping the position of every key so errors point at it.
//!
//! serde's internally tagged enums drop spans, so a stage table is read in two steps: `kind`,
//! `needs` and `matrix` are taken out of the spanned table first, then the rest is deserialized
//! into the parameter struct of that kind, whose errors keep their line and column.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::Path;

use miette::Diagnostic;
use serde::de::IntoDeserializer;
use thiserror::Error;
use toml::Spanned;
use toml::de::{DeString, DeTable, DeValue};

use super::diagnostic::{PipelineError, ReadError};
use super::graph::order_stages;
use super::matrix::expand;
use super::source::{Parser, RawStage};
use super::{Pipeline, PipelineSettings, StageInstance};
use crate::names::{did_you_mean, resolve};
use crate::stages::{self, StageParams};

/// Why a pipeline file could not be loaded.
#[derive(Debug, Error, Diagnostic)]
pub enum LoadError {
    /// The file could not be read.
    #[error(transparent)]
    #[diagnostic(transparent)]
    Read(#[from] ReadError),
    /// The file is not a valid pipeline.
    #[error(transparent)]
    #[diagnostic(transparent)]
    Invalid(#[from] Box<PipelineError>),
}

/// Reads and parses the pipeline file at `path`.
pub fn load(path: &Path) -> Result<Pipeline, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReadError {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse(path, &text)?)
}

/// Parses pipeline `text` as if read from `path` (used for relative paths and messages).
pub fn parse(path: &Path, text: &str) -> Result<Pipeline, Box<PipelineError>> {
    Parser { path, text }.parse()
}

const TOP_LEVEL_KEYS: &[&str] = &["pipeline", "stage"];
const RESERVED_STAGE_KEYS: &[&str] = &["kind", "needs", "matrix"];

impl<'a> Parser<'a> {
    fn parse(&self) -> Result<Pipeline, Box<PipelineError>> {
        let doc = DeTable::parse(self.text).map_err(|e| self.toml_error(&e, "", 0..0))?;
        let doc_span = doc.span();
        let mut doc = doc.into_inner();
        for (key, _) in doc.iter() {
            let name: &str = key.get_ref();
            if !TOP_LEVEL_KEYS.contains(&name) {
                return Err(self.unknown_key(key.span(), name, "at the top level", TOP_LEVEL_KEYS));
            }
        }

        let pipeline_dir = self
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let settings_value = doc
            .remove("pipeline")
            .unwrap_or_else(|| Spanned::new(0..0, DeValue::Table(DeTable::new())));
        let settings_table = match settings_value.get_ref() {
            DeValue::Table(t) => Spanned::new(settings_value.span(), t.clone()),
            _ => Spanned::new(settings_value.span(), DeTable::new()),
        };
        let settings = self.settings(settings_value)?;

        let stage_tables = match doc.remove("stage") {
            Some(v) => v,
            None => {
                return Err(self.error(
                    doc_span.start..doc_span.start,
                    "the pipeline has no stages",
                    Some("add a stage, e.g.\n[stage.caption]\nkind = \"caption\"\nimages = \"datasets/my-images\"".into()),
                ));
            }
        };
        let span = stage_tables.span();
        let DeValue::Table(stage_tables) = stage_tables.into_inner() else {
            return Err(self.error(
                span,
                "`stage` must be a table of stages",
                Some("write each stage as its own table: [stage.NAME]".into()),
            ));
        };

        let mut raw = Vec::new();
        for (name, value) in stage_tables {
            raw.push(self.raw_stage(name, value)?);
        }
        let mut instances: Vec<(StageInstance, usize)> = Vec::new();
        for (index, stage) in raw.iter().enumerate() {
            for point in expand(self, stage)? {
                let params = self.stage_params(stage, point.table, &point.matrix_spans)?;
                let mut params = params;
                if let Err(e) = params.normalize(&pipeline_dir) {
                    let span = self.field_span(&stage.table, &e.field);
                    return Err(self.error(
                        span,
                        format!("[stage.{}] {}", stage.name.get_ref(), e.message),
                        e.help,
                    ));
                }
                instances.push((
                    StageInstance {
                        name: point.name,
                        base: stage.name.get_ref().clone(),
                        params,
                        needs: Vec::new(),
                        matrix: point.values,
                    },
                    index,
                ));
            }
        }
        self.resolve_needs(&raw, &mut instances)?;
        let stages = order_stages(self, &raw, instances)?;

        let path = std::path::absolute(self.path).unwrap_or_else(|_| self.path.to_path_buf());
        let settings = self.finish_settings(settings, &pipeline_dir);
        self.check_settings(&settings, &settings_table, &stages)?;
        Ok(Pipeline {
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            path,
            settings,
            stages,
        })
    }

    fn settings(
        &self,
        value: Spanned<DeValue<'_>>,
    ) -> Result<PipelineSettings, Box<PipelineError>> {
        let span = value.span();
        if !matches!(value.get_ref(), DeValue::Table(_)) {
            return Err(self.error(
                span,
                "`pipeline` must be a table",
                Some("write it as [pipeline]".into()),
            ));
        }
        serde::Deserialize::deserialize(value.into_deserializer())
            .map_err(|e| self.toml_error(&e, "pipeline", span))
    }

    fn finish_settings(&self, mut s: PipelineSettings, dir: &Path) -> PipelineSettings {
        if s.name.is_empty() {
            s.name = self
                .path
                .file_stem()
                .map(|n| super::names::pipeline_name_from_stem(&n.to_string_lossy()))
                .unwrap_or_else(|| "pipeline".into());
        }
        s.base_model = s.base_model.map(|p| resolve(dir, &p));
        s.model_config = s.model_config.map(|p| resolve(dir, &p));
        s
    }

    /// Settings checks that need the stages: a model stage needs an existing `base_model`, and
    /// half precision needs a GPU.
    fn check_settings(
        &self,
        s: &PipelineSettings,
        table: &Spanned<DeTable<'_>>,
        stages: &[StageInstance],
    ) -> Result<(), Box<PipelineError>> {
        if let Err(message) = super::names::check_pipeline_name(&s.name) {
            return Err(self.error(
                self.field_span(table, "name"),
                format!("[pipeline] {message}"),
                Some(
                    "the name is a folder under outputs/: use letters, digits, `_`, `-` and `.` \
                     (e.g. name = \"corgi-v2\")"
                        .into(),
                ),
            ));
        }
        let model_stage = stages.iter().find(|st| st.params.uses_model());
        if let Some(stage) = model_stage {
            match &s.base_model {
                None => {
                    return Err(self.error(
                        self.field_span(table, "base_model"),
                        format!("stage `{}` needs a model but [pipeline] has no `base_model`", stage.name),
                        Some("add base_model = \"path/to/model.safetensors\" (a single file or a diffusers folder) to [pipeline]".into()),
                    ));
                }
                Some(p) if !p.exists() => {
                    return Err(self.error(
                        self.field_span(table, "base_model"),
                        format!("[pipeline] base_model {} does not exist", p.display()),
                        Some("`base_model` is relative to the pipeline file".into()),
                    ));
                }
                _ => {}
            }
        }
        if let Some(dir) = &s.model_config
            && !dir.is_dir()
        {
            return Err(self.error(
                self.field_span(table, "model_config"),
                format!("[pipeline] model_config {} is not a folder", dir.display()),
                Some("point it at a diffusers folder with unet/, vae/, text_encoder/ config.json files".into()),
            ));
        }
        if s.precision == crate::device::Precision::Bf16 {
            return Err(self.error(
                self.field_span(table, "precision"),
                "precision \"bf16\" is not available: dfdx 0.13 has no bfloat16 kernels",
                Some(
                    "use precision = \"f16\" (f16 storage, f32 arithmetic in every op) or \"f32\""
                        .into(),
                ),
            ));
        }
        if s.precision == crate::device::Precision::F16
            && let Some(stage) = stages.iter().find(|st| !st.params.supports_half())
        {
            return Err(self.error(
                self.field_span(table, "precision"),
                format!(
                    "precision \"f16\" is not implemented for stage `{}` ({}) yet: mixed \
                     precision covers sampling and the train stages",
                    stage.name,
                    stage.params.describe()
                ),
                Some("use precision = \"f32\" for pipelines that pretrain".into()),
            ));
        }
        if let crate::device::DeviceChoice::Cuda(n) = s.device
            && !crate::device::cuda_available()
        {
            return Err(self.error(
                self.field_span(table, "device"),
                format!("device \"cuda:{n}\" is not available: this binary was built without CUDA"),
                Some("use device = \"auto\" or \"cpu\", or build with --features cuda".into()),
            ));
        }
        Ok(())
    }

    fn raw_stage<'i>(
        &self,
        name: Spanned<DeString<'i>>,
        value: Spanned<DeValue<'i>>,
    ) -> Result<RawStage<'i>, Box<PipelineError>> {
        let name_span = name.span();
        let stage_name = name.get_ref().to_string();
        if stage_name.is_empty()
            || !stage_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(self.error(
                name_span,
                format!("invalid stage name `{stage_name}`"),
                Some("stage names use letters, digits, `_` and `-` only".into()),
            ));
        }
        let table_span = value.span();
        let DeValue::Table(mut table) = value.into_inner() else {
            return Err(self.error(
                table_span,
                format!("stage `{stage_name}` must be a table"),
                Some(format!(
                    "write it as [stage.{stage_name}] followed by its keys"
                )),
            ));
        };

        let kind = match table.remove("kind") {
            None => {
                return Err(self.error(
                    name_span,
                    format!("stage `{stage_name}` has no `kind`"),
                    Some(format!(
                        "add `kind = \"...\"`; kinds: {}",
                        stages::KINDS.join(", ")
                    )),
                ));
            }
            Some(kind) => {
                let span = kind.span();
                let Some(kind_name) = kind.get_ref().as_str() else {
                    return Err(self.error(
                        span,
                        "`kind` must be a string",
                        Some(format!("kinds: {}", stages::KINDS.join(", "))),
                    ));
                };
                match stages::KINDS.iter().find(|k| **k == kind_name) {
                    Some(k) => *k,
                    None => {
                        let help = match did_you_mean(kind_name, stages::KINDS.iter().copied()) {
                            Some(s) => {
                                format!("did you mean `{s}`? kinds: {}", stages::KINDS.join(", "))
                            }
                            None => format!("kinds: {}", stages::KINDS.join(", ")),
                        };
                        return Err(self.error(
                            span,
                            format!("unknown stage kind `{kind_name}`"),
                            Some(help),
                        ));
                    }
                }
            }
        };

        let mut needs = Vec::new();
        let mut needs_span = None;
        if let Some(value) = table.remove("needs") {
            needs_span = Some(value.span());
            let help = Some("write `needs = [\"other-stage\", ...]`".to_string());
            match value.get_ref() {
                DeValue::String(s) => needs.push(Spanned::new(value.span(), s.to_string())),
                DeValue::Array(items) => {
                    for item in items.iter() {
                        match item.get_ref().as_str() {
                            Some(s) => needs.push(Spanned::new(item.span(), s.to_string())),
                            None => {
                                return Err(self.error(
                                    item.span(),
                                    "`needs` entries must be stage names (strings)",
                                    help,
                                ));
                            }
                        }
                    }
                }
                _ => {
                    return Err(self.error(
                        value.span(),
                        "`needs` must be a list of stage names",
                        help,
                    ));
                }
            }
        }

        let matrix = match table.remove("matrix") {
            None => Vec::new(),
            Some(value) => super::matrix::axes(self, value)?,
        };

        Ok(RawStage {
            name: Spanned::new(name_span, stage_name),
            kind,
            needs,
            needs_span,
            matrix,
            table: Spanned::new(table_span, table),
        })
    }

    fn stage_params(
        &self,
        stage: &RawStage<'_>,
        table: Spanned<DeTable<'_>>,
        matrix_spans: &[Range<usize>],
    ) -> Result<StageParams, Box<PipelineError>> {
        let span = table.span();
        let owned_span = span.clone();
        let value = Spanned::new(span, DeValue::Table(table.into_inner()));
        let params = StageParams::parse(stage.kind, value).map_err(|e| {
            let at = e.span().unwrap_or(owned_span.clone());
            if matrix_spans.contains(&at)
                && let Some(field) = unknown_field(e.message())
            {
                return self.error(
                    at,
                    format!(
                        "[stage.{}] matrix over unknown parameter `{}` of kind `{}`",
                        stage.name.get_ref(),
                        field.name,
                        stage.kind
                    ),
                    Some(suggest(&field.name, &field.expected)),
                );
            }
            self.toml_error(
                &e,
                &format!("stage.{}", stage.name.get_ref()),
                owned_span.clone(),
            )
        })?;
        if let Err(e) = params.validate() {
            let span = self.field_span(&stage.table, &e.field);
            return Err(self.error(
                span,
                format!("[stage.{}] {}", stage.name.get_ref(), e.message),
                e.help,
            ));
        }
        Ok(params)
    }

    fn resolve_needs(
        &self,
        raw: &[RawStage<'_>],
        instances: &mut [(StageInstance, usize)],
    ) -> Result<(), Box<PipelineError>> {
        let all_names: Vec<String> = raw
            .iter()
            .map(|r| r.name.get_ref().clone())
            .chain(instances.iter().map(|(i, _)| i.name.clone()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut resolved: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for (index, stage) in raw.iter().enumerate() {
            let mut names = Vec::new();
            let mut seen = HashSet::new();
            for need in &stage.needs {
                let n = need.get_ref();
                let matching: Vec<&str> = instances
                    .iter()
                    .filter(|(i, _)| &i.name == n || &i.base == n)
                    .map(|(i, _)| i.name.as_str())
                    .collect();
                if matching.is_empty() {
                    let help = match did_you_mean(n, all_names.iter().map(String::as_str)) {
                        Some(s) => format!("did you mean `{s}`? stages: {}", raw_names(raw)),
                        None => format!("stages in this file: {}", raw_names(raw)),
                    };
                    return Err(self.error(
                        need.span(),
                        format!("[stage.{}] needs unknown stage `{n}`", stage.name.get_ref()),
                        Some(help),
                    ));
                }
                for m in matching {
                    if seen.insert(m.to_string()) {
                        names.push(m.to_string());
                    }
                }
            }
            // A stage kind may require upstream stages of certain kinds.
            for required in StageParams::required_upstream(stage.kind) {
                let count = names
                    .iter()
                    .filter(|n| {
                        instances
                            .iter()
                            .any(|(i, _)| &&i.name == n && i.params.kind() == *required)
                    })
                    .count();
                if count != 1 {
                    let span = stage.needs_span.clone().unwrap_or(stage.name.span());
                    return Err(self.error(
                        span,
                        format!(
                            "[stage.{}] a `{}` stage needs exactly one `{required}` stage, found {count}",
                            stage.name.get_ref(),
                            stage.kind
                        ),
                        Some(format!("list the `{required}` stage it reads in `needs`")),
                    ));
                }
            }
            resolved.insert(index, names);
        }
        for (instance, index) in instances.iter_mut() {
            instance.needs = resolved.get(index).cloned().unwrap_or_default();
        }
        Ok(())
    }

    fn unknown_key(
        &self,
        span: Range<usize>,
        key: &str,
        place: &str,
        known: &[&str],
    ) -> Box<PipelineError> {
        self.error(
            span,
            format!("unknown key `{key}` {place}"),
            Some(suggest(key, known)),
        )
    }

    /// Converts a toml/serde error into a diagnostic at its span, rewording the common cases.
    pub fn toml_error(
        &self,
        e: &toml::de::Error,
        table: &str,
        fallback: Range<usize>,
    ) -> Box<PipelineError> {
        let span = e.span().unwrap_or(fallback);
        let message = e.message().trim().to_string();
        let place = if table.is_empty() {
            String::new()
        } else {
            format!("[{table}] ")
        };
        if let Some(field) = unknown_field(&message) {
            return self.error(
                span,
                format!("{place}unknown key `{}`", field.name),
                Some(suggest(&field.name, &field.expected)),
            );
        }
        if let Some(field) = message.strip_prefix("missing field ") {
            return self.error(
                span,
                format!("{place}missing key {field}"),
                Some(format!("add {field} = ... to [{table}]")),
            );
        }
        let help = if message.starts_with("invalid type") {
            Some("check the value's type: strings need quotes, lists use [ ... ]".to_string())
        } else if table.is_empty() {
            Some("see the TOML syntax at https://toml.io".to_string())
        } else {
            None
        };
        self.error(span, format!("{place}{message}"), help)
    }
}

fn raw_names(raw: &[RawStage<'_>]) -> String {
    raw.iter()
        .map(|r| r.name.get_ref().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

struct UnknownField {
    name: String,
    expected: Vec<String>,
}

/// Parses serde's "unknown field `x`, expected one of `a`, `b`" (or "expected `a`").
fn unknown_field(message: &str) -> Option<UnknownField> {
    let rest = message.strip_prefix("unknown field `")?;
    let (name, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    Some(UnknownField {
        name: name.to_string(),
        expected,
    })
}

fn suggest<S: AsRef<str>>(word: &str, known: &[S]) -> String {
    let known: Vec<&str> = known
        .iter()
        .map(AsRef::as_ref)
        .filter(|k| !RESERVED_STAGE_KEYS.contains(k))
        .collect();
    match did_you_mean(word, known.iter().copied()) {
        Some(s) => format!("did you mean `{s}`? valid keys: {}", known.join(", ")),
        None => format!("valid keys: {}", known.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_serde_unknown_field_messages() {
        let f =
            unknown_field("unknown field `templat`, expected one of `images`, `template`").unwrap();
        assert_eq!(f.name, "templat");
        assert_eq!(f.expected, vec!["images", "template"]);
        let f = unknown_field("unknown field `x`, expected `y`").unwrap();
        assert_eq!(f.expected, vec!["y"]);
    }
}
