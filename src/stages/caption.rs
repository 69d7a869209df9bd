//! `caption`: pairs each image of a folder with its caption, from a sidecar file, a template,
//! or both (template as fallback), and writes a caption manifest.

use crate::stages::artifact::Artifact;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::ParamError;
use super::context::{StageContext, StageResult};
use crate::cache::FileHasher;
use crate::image::is_image_file;

/// Implementation version (part of the key).
pub const VERSION: u32 = 1;

const PLACEHOLDERS: &[&str] = &["token", "class", "filename"];

/// `[stage.NAME] kind = "caption"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptionParams {
    /// Folder of images (JPEG, PNG, WebP), relative to the pipeline file.
    pub images: PathBuf,
    /// Also look in subfolders.
    #[serde(default)]
    pub recursive: bool,
    /// Read captions from sidecar files next to the images.
    #[serde(default = "default_true")]
    pub use_sidecars: bool,
    /// Sidecar extensions, in order of preference (`img.png` → `img.txt`, `img.caption`).
    #[serde(default = "default_sidecar_extensions")]
    pub sidecar_extensions: Vec<String>,
    /// Caption for images without a sidecar: `{token}`, `{class}` and `{filename}` (the file
    /// stem) are replaced. With `use_sidecars = false`, the caption of every image.
    #[serde(default)]
    pub template: Option<String>,
    /// The placeholder token of the concept (e.g. `sks`).
    #[serde(default)]
    pub token: Option<String>,
    /// The class word (e.g. `dog`).
    #[serde(default)]
    pub class: Option<String>,
}

fn default_true() -> bool {
    true
}

fn default_sidecar_extensions() -> Vec<String> {
    vec!["txt".into(), "caption".into()]
}

/// One image and its caption.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionItem {
    /// Path relative to the images folder, `/`-separated.
    pub file: String,
    /// blake3 of the image file.
    pub hash: String,
    /// The caption.
    pub caption: String,
    /// `sidecar:<file>` or `template`.
    pub source: String,
}

/// The `manifest.json` output of a caption stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionManifest {
    /// Images in path order.
    pub items: Vec<CaptionItem>,
}

/// An image found in the folder, with its sidecar if any.
struct Found {
    rel: String,
    path: PathBuf,
    sidecar: Option<PathBuf>,
}

impl CaptionParams {
    pub(super) fn validate(&self) -> Result<(), ParamError> {
        if !self.use_sidecars && self.template.is_none() {
            return Err(ParamError::new(
                "use_sidecars",
                "with `use_sidecars = false` a `template` is required",
                "add e.g. template = \"a photo of {token} {class}\"",
            ));
        }
        if let Some(t) = &self.template {
            for name in placeholders(t).map_err(|m| {
                ParamError::new("template", m, "placeholders: {token}, {class}, {filename}")
            })? {
                if !PLACEHOLDERS.contains(&name.as_str()) {
                    let help = match crate::names::did_you_mean(&name, PLACEHOLDERS.iter().copied())
                    {
                        Some(s) => format!(
                            "did you mean {{{s}}}? placeholders: {{token}}, {{class}}, {{filename}}"
                        ),
                        None => "placeholders: {token}, {class}, {filename}".to_string(),
                    };
                    return Err(ParamError::new(
                        "template",
                        format!("unknown placeholder {{{name}}} in `template`"),
                        help,
                    ));
                }
                if name == "token" && self.token.is_none() {
                    return Err(ParamError::new(
                        "template",
                        "`template` uses {token} but `token` is not set",
                        "add token = \"sks\" (your concept's token)",
                    ));
                }
                if name == "class" && self.class.is_none() {
                    return Err(ParamError::new(
                        "template",
                        "`template` uses {class} but `class` is not set",
                        "add class = \"dog\" (the concept's class word)",
                    ));
                }
            }
        }
        if self.use_sidecars && self.sidecar_extensions.is_empty() {
            return Err(ParamError::new(
                "sidecar_extensions",
                "`sidecar_extensions` is empty",
                "list at least one, e.g. [\"txt\"], or set use_sidecars = false",
            ));
        }
        Ok(())
    }

    pub(super) fn normalize(&mut self, dir: &Path) -> Result<(), ParamError> {
        self.images = crate::names::resolve(dir, &self.images);
        if !self.images.is_dir() {
            return Err(ParamError::new(
                "images",
                format!("images folder {} does not exist", self.images.display()),
                "`images` is relative to the pipeline file",
            ));
        }
        for ext in &mut self.sidecar_extensions {
            *ext = ext.trim_start_matches('.').to_ascii_lowercase();
        }
        Ok(())
    }

    pub(super) fn key_params(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = v.as_object_mut() {
            map.remove("images");
            if !self.use_sidecars {
                map.remove("sidecar_extensions");
            }
        }
        v
    }

    fn scan(&self) -> anyhow::Result<Vec<Found>> {
        let mut found = Vec::new();
        let mut stack = vec![self.images.clone()];
        while let Some(dir) = stack.pop() {
            let entries = std::fs::read_dir(&dir)
                .with_context(|| format!("cannot list images folder {}", dir.display()))?;
            for entry in entries {
                let entry = entry
                    .with_context(|| format!("cannot list images folder {}", dir.display()))?;
                let path = entry.path();
                let file_type = entry.file_type()?;
                if file_type.is_dir() {
                    if self.recursive {
                        stack.push(path);
                    }
                    continue;
                }
                if !is_image_file(&path) {
                    continue;
                }
                let rel = path
                    .strip_prefix(&self.images)
                    .unwrap_or(&path)
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                let sidecar = if self.use_sidecars {
                    self.sidecar_extensions
                        .iter()
                        .map(|ext| path.with_extension(ext))
                        .find(|p| p.is_file())
                } else {
                    None
                };
                found.push(Found { rel, path, sidecar });
            }
        }
        found.sort_by(|a, b| a.rel.cmp(&b.rel));
        Ok(found)
    }

    pub(super) fn inputs(&self, hasher: &FileHasher) -> anyhow::Result<BTreeMap<String, String>> {
        let mut inputs = BTreeMap::new();
        for f in self.scan()? {
            inputs.insert(
                f.rel.clone(),
                hasher
                    .hash_file(&f.path)
                    .with_context(|| format!("cannot read {}", f.path.display()))?,
            );
            if let Some(s) = &f.sidecar {
                let name = format!("{}/{}", parent_of(&f.rel), file_name(s));
                inputs.insert(
                    name.trim_start_matches('/').to_string(),
                    hasher
                        .hash_file(s)
                        .with_context(|| format!("cannot read {}", s.display()))?,
                );
            }
        }
        Ok(inputs)
    }

    pub(super) fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        let found = self.scan()?;
        if found.is_empty() {
            bail!(
                "no images in {} (looked for {})",
                self.images.display(),
                crate::image::IMAGE_EXTENSIONS.join(", ")
            );
        }
        let mut items = Vec::with_capacity(found.len());
        let mut missing = Vec::new();
        let (mut from_sidecar, mut from_template) = (0, 0);
        for f in &found {
            ctx.check_cancelled()?;
            let hash = ctx
                .hasher
                .hash_file(&f.path)
                .with_context(|| format!("cannot read {}", f.path.display()))?;
            let (caption, source) = match &f.sidecar {
                Some(s) => {
                    let text = std::fs::read_to_string(s)
                        .with_context(|| format!("cannot read caption file {}", s.display()))?;
                    let caption = clean_caption(&text);
                    if caption.is_empty() {
                        match &self.template {
                            Some(t) => (self.fill(t, &f.path), "template".to_string()),
                            None => {
                                missing.push(format!(
                                    "{} (its caption file {} is empty)",
                                    f.rel,
                                    file_name(s)
                                ));
                                continue;
                            }
                        }
                    } else {
                        from_sidecar += 1;
                        (caption, format!("sidecar:{}", file_name(s)))
                    }
                }
                None => match &self.template {
                    Some(t) => (self.fill(t, &f.path), "template".to_string()),
                    None => {
                        missing.push(f.rel.clone());
                        continue;
                    }
                },
            };
            if source == "template" {
                from_template += 1;
            }
            items.push(CaptionItem {
                file: f.rel.clone(),
                hash,
                caption,
                source,
            });
        }
        if !missing.is_empty() {
            bail!(
                "{} image(s) in {} have no caption and there is no `template` to fall back on:\n  {}\nadd a sidecar file ({}) next to each, or set `template`",
                missing.len(),
                self.images.display(),
                missing.join("\n  "),
                self.sidecar_extensions
                    .iter()
                    .map(|e| format!(".{e}"))
                    .collect::<Vec<_>>()
                    .join(" or "),
            );
        }
        let manifest = CaptionManifest { items };
        let bytes = serde_json::to_vec_pretty(&manifest)?;
        let mut result = StageResult::default();
        result.outputs.insert(
            Artifact::Manifest.file_name().into(),
            ctx.store.put_bytes(&bytes)?,
        );
        result
            .stats
            .insert("images".into(), manifest.items.len().into());
        result
            .stats
            .insert("from_sidecar".into(), from_sidecar.into());
        result
            .stats
            .insert("from_template".into(), from_template.into());
        result.summary = format!(
            "{} images: {from_sidecar} sidecar captions, {from_template} from template",
            manifest.items.len()
        );
        Ok(result)
    }

    fn fill(&self, template: &str, path: &Path) -> String {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let caption = template
            .replace("{token}", self.token.as_deref().unwrap_or(""))
            .replace("{class}", self.class.as_deref().unwrap_or(""))
            .replace("{filename}", &stem);
        clean_caption(&caption)
    }
}

/// Trims and collapses whitespace (newlines included) to single spaces.
fn clean_caption(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The `{name}` placeholders of a template.
fn placeholders(template: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed `{{` in template {template:?}"))?;
        out.push(after[..end].to_string());
        rest = &after[end + 1..];
    }
    Ok(out)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn parent_of(rel: &str) -> &str {
    rel.rsplit_once('/').map(|(p, _)| p).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_placeholders() {
        assert_eq!(
            placeholders("a {token} {class}").unwrap(),
            vec!["token", "class"]
        );
        assert!(placeholders("a {token").is_err());
    }

    #[test]
    fn cleans_captions() {
        assert_eq!(
            clean_caption("  a red\n star \t on blue \n"),
            "a red star on blue"
        );
    }
}
