//! PNG files with text metadata: AUTOMATIC1111's `parameters` chunk (so A1111's "PNG Info",
//! ComfyUI and image sites read the generation settings back), written atomically.

use std::io::{Cursor, Write};
use std::path::Path;

use image::RgbImage;

use super::RenderError;

/// Keyword of the text chunk A1111 stores generation settings in.
pub const PARAMETERS_KEY: &str = "parameters";

/// Generation settings in A1111's `parameters` text format:
///
/// ```text
/// <prompt>
/// Negative prompt: <negative prompt>
/// Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: abcdef1234, Model: name
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParameters {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (the line is omitted when empty, as A1111 does).
    pub negative_prompt: String,
    /// Sampling steps.
    pub steps: u32,
    /// Sampler in A1111's naming (`Euler a`, `Euler`, `DDIM`; see
    /// `SamplerKind::a1111_name`).
    pub sampler: String,
    /// Classifier-free guidance scale.
    pub cfg_scale: f32,
    /// Seed.
    pub seed: u64,
    /// Image width.
    pub width: u32,
    /// Image height.
    pub height: u32,
    /// Short model hash (A1111 writes the first 10 hex digits of the file's SHA-256).
    pub model_hash: Option<String>,
    /// Model name.
    pub model: Option<String>,
    /// Further `key: value` settings written after `Model`, in order (e.g. `Clip skip`,
    /// `Lora hashes`, `Version`).
    pub extra: Vec<(String, String)>,
}

impl GenerationParameters {
    /// The `parameters` text exactly as A1111's `create_infotext` writes it.
    pub fn to_infotext(&self) -> String {
        let mut pairs: Vec<(String, String)> = vec![
            ("Steps".into(), self.steps.to_string()),
            ("Sampler".into(), self.sampler.clone()),
            ("CFG scale".into(), format_number(self.cfg_scale)),
            ("Seed".into(), self.seed.to_string()),
            ("Size".into(), format!("{}x{}", self.width, self.height)),
        ];
        if let Some(h) = &self.model_hash {
            pairs.push(("Model hash".into(), h.clone()));
        }
        if let Some(m) = &self.model {
            pairs.push(("Model".into(), m.clone()));
        }
        pairs.extend(self.extra.iter().cloned());
        let params = pairs
            .iter()
            .map(|(k, v)| {
                if k == v {
                    k.clone()
                } else {
                    format!("{k}: {}", quote(v))
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let negative = if self.negative_prompt.is_empty() {
            String::new()
        } else {
            format!("\nNegative prompt: {}", self.negative_prompt)
        };
        format!("{}{negative}\n{params}", self.prompt)
            .trim()
            .to_string()
    }

    /// Parses A1111 `parameters` text (as A1111's `parse_generation_parameters` does: the last
    /// line holds the settings when it has at least three `key: value` pairs).
    pub fn parse_infotext(text: &str) -> Result<Self, RenderError> {
        let text = text.trim();
        let mut lines: Vec<&str> = text.split('\n').collect();
        let last = lines.pop().unwrap_or("");
        let mut settings = parse_settings(last);
        if settings.len() < 3 {
            lines.push(last);
            settings.clear();
        }
        let (mut prompt, mut negative) = (String::new(), String::new());
        let mut in_negative = false;
        for line in lines {
            let mut line = line.trim();
            if let Some(rest) = line.strip_prefix("Negative prompt:") {
                in_negative = true;
                line = rest.trim();
            }
            let target = if in_negative {
                &mut negative
            } else {
                &mut prompt
            };
            if !target.is_empty() {
                target.push('\n');
            }
            target.push_str(line);
        }
        let mut take = |key: &str| -> Option<String> {
            let i = settings.iter().position(|(k, _)| k == key)?;
            Some(settings.remove(i).1)
        };
        let missing = |key: &str| RenderError::Parameters(format!("no {key:?} in {text:?}"));
        let bad = |key: &str, v: &str| RenderError::Parameters(format!("bad {key} value {v:?}"));
        let steps_s = take("Steps").ok_or_else(|| missing("Steps"))?;
        let steps = steps_s.parse().map_err(|_| bad("Steps", &steps_s))?;
        let sampler = take("Sampler").ok_or_else(|| missing("Sampler"))?;
        let cfg_s = take("CFG scale").ok_or_else(|| missing("CFG scale"))?;
        let cfg_scale = cfg_s.parse().map_err(|_| bad("CFG scale", &cfg_s))?;
        let seed_s = take("Seed").ok_or_else(|| missing("Seed"))?;
        let seed = seed_s.parse().map_err(|_| bad("Seed", &seed_s))?;
        let size = take("Size").ok_or_else(|| missing("Size"))?;
        let (width, height) = size
            .split_once('x')
            .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)))
            .ok_or_else(|| bad("Size", &size))?;
        let model_hash = take("Model hash");
        let model = take("Model");
        Ok(Self {
            prompt,
            negative_prompt: negative,
            steps,
            sampler,
            cfg_scale,
            seed,
            width,
            height,
            model_hash,
            model,
            extra: settings,
        })
    }
}

/// Python's `str()` of a number as A1111 shows it: `7`, `7.5`.
fn format_number(x: f32) -> String {
    format!("{x}")
}

/// A1111's `quote`: values with `,`, `:` or a newline are written as JSON strings.
fn quote(v: &str) -> String {
    if v.contains([',', '\n', ':']) {
        serde_json::to_string(v).unwrap_or_else(|_| v.to_string())
    } else {
        v.to_string()
    }
}

/// `key: value` pairs of a settings line (A1111's `re_param`:
/// `\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)`).
fn parse_settings(line: &str) -> Vec<(String, String)> {
    let chars: Vec<char> = line.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let start = i;
        let is_word = |c: char| c.is_alphanumeric() || c == '_';
        if i >= chars.len() || !is_word(chars[i]) {
            // Not a key: skip to the next comma.
            while i < chars.len() && chars[i] != ',' {
                i += 1;
            }
            i += 1;
            continue;
        }
        while i < chars.len() && (is_word(chars[i]) || matches!(chars[i], ' ' | '-' | '/')) {
            i += 1;
        }
        if i >= chars.len() || chars[i] != ':' || i - start < 2 {
            while i < chars.len() && chars[i] != ',' {
                i += 1;
            }
            i += 1;
            continue;
        }
        let key: String = chars[start..i].iter().collect();
        i += 1;
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let value = if i < chars.len() && chars[i] == '"' {
            let vstart = i;
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i = (i + 1).min(chars.len());
            let raw: String = chars[vstart..i].iter().collect();
            serde_json::from_str::<String>(&raw).unwrap_or(raw)
        } else {
            let vstart = i;
            while i < chars.len() && chars[i] != ',' {
                i += 1;
            }
            chars[vstart..i].iter().collect::<String>()
        };
        // Skip the separating comma.
        while i < chars.len() && chars[i] != ',' {
            i += 1;
        }
        i += 1;
        out.push((key.trim_end().to_string(), value.trim_end().to_string()));
    }
    out
}

/// Encodes an RGB image as PNG with text chunks: `tEXt` when the text is Latin-1, `iTXt`
/// (UTF-8) otherwise, as PIL does for A1111.
pub fn encode_png(image: &RgbImage, text: &[(&str, &str)]) -> Result<Vec<u8>, RenderError> {
    let png_err = |e: png::EncodingError| RenderError::Png(e.to_string());
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for (key, value) in text {
            let key_ok =
                !key.is_empty() && key.len() < 80 && key.chars().all(|c| (' '..='~').contains(&c));
            if !key_ok {
                return Err(RenderError::Png(format!(
                    "invalid PNG text keyword {key:?}: 1-79 printable ASCII characters"
                )));
            }
            if value.chars().all(|c| (c as u32) < 256) {
                encoder
                    .add_text_chunk(key.to_string(), value.to_string())
                    .map_err(png_err)?;
            } else {
                encoder
                    .add_itxt_chunk(key.to_string(), value.to_string())
                    .map_err(png_err)?;
            }
        }
        let mut writer = encoder.write_header().map_err(png_err)?;
        writer.write_image_data(image.as_raw()).map_err(png_err)?;
        writer.finish().map_err(png_err)?;
    }
    Ok(out)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, synced, then
/// renamed over `path`. A crash leaves either the old file or the new one, never half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RenderError> {
    let io_err = |source: std::io::Error| RenderError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".to_string());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io_err)?;
    tmp.write_all(bytes).map_err(io_err)?;
    tmp.as_file().sync_all().map_err(io_err)?;
    tmp.persist(path).map_err(|e| io_err(e.error))?;
    Ok(())
}

/// Encodes and writes a PNG with text chunks atomically.
pub fn write_png_atomic(
    path: &Path,
    image: &RgbImage,
    text: &[(&str, &str)],
) -> Result<(), RenderError> {
    let bytes = encode_png(image, text)?;
    write_atomic(path, &bytes)
}

/// Writes `image` to `path` (atomically) with an A1111 `parameters` chunk.
pub fn write_png_with_parameters(
    path: impl AsRef<Path>,
    image: &RgbImage,
    params: &GenerationParameters,
) -> Result<(), RenderError> {
    let text = params.to_infotext();
    write_png_atomic(path.as_ref(), image, &[(PARAMETERS_KEY, text.as_str())])
}

/// All text chunks (`tEXt`, `zTXt`, `iTXt`, before or after the image data) of PNG bytes, as
/// (keyword, text) in file order per chunk type.
pub fn read_png_text_bytes(bytes: &[u8]) -> Result<Vec<(String, String)>, RenderError> {
    let dec_err = |e: png::DecodingError| RenderError::Png(e.to_string());
    let mut reader = png::Decoder::new(Cursor::new(bytes))
        .read_info()
        .map_err(dec_err)?;
    // Decode the image so chunks placed after IDAT are seen too.
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| RenderError::Png("image too large to decode".to_string()))?;
    let mut buf = vec![0u8; size];
    reader.next_frame(&mut buf).map_err(dec_err)?;
    reader.finish().map_err(dec_err)?;
    let info = reader.info();
    let mut out = Vec::new();
    for c in &info.uncompressed_latin1_text {
        out.push((c.keyword.clone(), c.text.clone()));
    }
    for c in &info.compressed_latin1_text {
        out.push((c.keyword.clone(), c.get_text().map_err(dec_err)?));
    }
    for c in &info.utf8_text {
        out.push((c.keyword.clone(), c.get_text().map_err(dec_err)?));
    }
    Ok(out)
}

/// All text chunks of a PNG file.
pub fn read_png_text(path: impl AsRef<Path>) -> Result<Vec<(String, String)>, RenderError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| RenderError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_png_text_bytes(&bytes).map_err(|e| match e {
        RenderError::Png(m) => RenderError::Png(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// The A1111 generation settings of a PNG file, if it has a `parameters` chunk.
pub fn read_parameters(
    path: impl AsRef<Path>,
) -> Result<Option<GenerationParameters>, RenderError> {
    read_png_text(path)?
        .into_iter()
        .find(|(k, _)| k == PARAMETERS_KEY)
        .map(|(_, v)| GenerationParameters::parse_infotext(&v))
        .transpose()
}
