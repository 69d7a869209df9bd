//! Names a user writes: the pipeline's name (`outputs/<name>/`), stage instance names
//! (`outputs/<name>/<instance>/`, `images/<variant>/` in a grid), the relative names of a
//! stage's outputs, paths relative to the pipeline file, and suggestions for typos. Nothing a
//! pipeline file says may reach outside its folders.

use std::path::{Component, Path, PathBuf};

/// The longest folder name an instance maps to (file systems allow 255 bytes; the staging
/// folder adds a prefix and a suffix).
const MAX_FOLDER_BYTES: usize = 200;

/// Checks a pipeline name written in `[pipeline] name`: one folder under `outputs/`.
///
/// Letters, digits, `_`, `-` and `.`, starting with a letter, digit or `_`: never `.`, `..`,
/// a hidden folder, a separator or an absolute path.
pub fn check_pipeline_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the pipeline name is empty".into());
    }
    if name.len() > MAX_FOLDER_BYTES {
        return Err(format!(
            "the pipeline name is {} bytes long; the limit is {MAX_FOLDER_BYTES}",
            name.len()
        ));
    }
    let first = name.chars().next().unwrap_or('.');
    if !(first.is_ascii_alphanumeric() || first == '_') {
        return Err(format!(
            "the pipeline name `{name}` must start with a letter, a digit or `_`"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!(
            "the pipeline name `{name}` contains {}",
            describe_char(c)
        ));
    }
    Ok(())
}

/// The pipeline name a file stem gives when `[pipeline] name` is not set: the stem with every
/// character [`check_pipeline_name`] refuses replaced by `_`.
pub fn pipeline_name_from_stem(stem: &str) -> String {
    let mut name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
        name.insert(0, '_');
    }
    name.truncate(MAX_FOLDER_BYTES);
    name
}

/// The folder a stage instance (or grid variant) is written to: its name where every
/// character is safe in a file name, otherwise percent-encoded (`/` → `%2F`), so a matrix
/// value such as `a/../../x` stays inside one folder. Distinct names give distinct folders;
/// names too long for a folder keep a prefix and a hash of the whole name.
pub fn folder_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, c) in name.chars().enumerate() {
        let safe = c.is_alphanumeric()
            || matches!(
                c,
                '_' | '-' | '=' | '@' | ',' | '+' | ' ' | '(' | ')' | '[' | ']' | '{' | '}'
            )
            || (c == '.' && i > 0);
        if safe && !c.is_control() {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    // A trailing space or dot is dropped by some file systems (Windows, SMB shares).
    if out.ends_with([' ', '.']) {
        let last = out.pop().unwrap_or(' ');
        out.push_str(&format!("%{:02X}", last as u32));
    }
    if out.len() > MAX_FOLDER_BYTES {
        let hash = blake3::hash(name.as_bytes()).to_hex();
        let mut cut = MAX_FOLDER_BYTES - 14;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        // Never end in the middle of a `%XX` escape.
        let tail = out.len().saturating_sub(2);
        if let Some(pos) = out.as_bytes()[tail..].iter().position(|&b| b == b'%') {
            out.truncate(tail + pos);
        }
        out.push('~');
        out.push_str(&hash[..12]);
    }
    out
}

/// Checks the relative name of a stage output (`images/base/00-1.png`): only plain
/// components, never absolute, `..`, `.` or empty.
pub fn check_output_name(rel: &str) -> Result<&Path, String> {
    let path = Path::new(rel);
    if rel.is_empty() {
        return Err("an output has an empty name".into());
    }
    for component in path.components() {
        match component {
            Component::Normal(part) if !part.to_string_lossy().starts_with(".sdpipe") => {}
            _ => {
                return Err(format!(
                    "output name `{rel}` is not a plain relative path inside its stage folder"
                ));
            }
        }
    }
    Ok(path)
}

fn describe_char(c: char) -> String {
    match c {
        '/' | '\\' => format!("a path separator (`{c}`)"),
        c if c.is_control() => format!("a control character (U+{:04X})", c as u32),
        c => format!("`{c}`"),
    }
}

/// The candidate closest to `word` if it is plausibly a typo of it.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// `p` relative to `dir` unless absolute.
pub fn resolve(dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_names_cannot_leave_outputs() {
        for bad in [
            "", "..", ".", "../x", "/abs", "a/b", "a\\b", ".hidden", "-x", "a b", "x\0",
        ] {
            assert!(check_pipeline_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["corgi", "corgi-v2.1", "_x", "2026_run", "quickstart"] {
            assert!(check_pipeline_name(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn stems_become_valid_names() {
        for stem in ["my run", ".hidden", "..", "a/b", "ok", "été"] {
            let name = pipeline_name_from_stem(stem);
            assert!(check_pipeline_name(&name).is_ok(), "{stem:?} → {name:?}");
        }
        assert_eq!(pipeline_name_from_stem("quickstart"), "quickstart");
    }

    #[test]
    fn folder_names_are_one_component_and_distinct() {
        assert_eq!(folder_name("train@method=lora"), "train@method=lora");
        assert_eq!(
            folder_name("train@lr=1e-4,lora.rank=4"),
            "train@lr=1e-4,lora.rank=4"
        );
        let names = [
            "caption@template=a/../../x",
            "caption@template=a%2F..%2F..%2Fx",
            "caption@template=a_.._.._x",
            "x@t=..",
            "x@t=/etc",
            "x@t=a\\b",
            "x@t=a\nb",
            "x@t=a.",
        ];
        let mut seen = std::collections::BTreeSet::new();
        for name in names {
            let folder = folder_name(name);
            let path = Path::new(&folder);
            assert_eq!(path.components().count(), 1, "{name:?} → {folder:?}");
            assert!(
                matches!(path.components().next(), Some(Component::Normal(_))),
                "{name:?} → {folder:?}"
            );
            assert!(!folder.contains(['/', '\\', '\n']), "{folder:?}");
            assert!(seen.insert(folder), "{name:?} collides");
        }
    }

    #[test]
    fn long_folder_names_are_cut_with_a_hash() {
        let a = format!("grid@template={}", "a/".repeat(300));
        let b = format!("grid@template={}b", "a/".repeat(300));
        let (fa, fb) = (folder_name(&a), folder_name(&b));
        assert!(fa.len() <= MAX_FOLDER_BYTES, "{}", fa.len());
        assert_ne!(fa, fb);
        assert!(!fa.contains('/'));
    }

    #[test]
    fn output_names_stay_inside() {
        for bad in ["", "../x", "/x", "a/../../x", "./x", ".sdpipe-outputs.json"] {
            assert!(check_output_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["grid.png", "images/base/00-1.png", "lora.safetensors"] {
            assert!(check_output_name(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn suggests_close_names_only() {
        let names = ["template", "token", "images"];
        assert_eq!(did_you_mean("templat", names), Some("template"));
        assert_eq!(did_you_mean("zzzzzz", names), None);
    }
}
