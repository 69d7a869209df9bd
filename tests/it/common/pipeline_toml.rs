//! A pipeline file built as TOML values instead of copied strings: tests start from one of the
//! shared bases ([`PipelineToml::basic`], [`PipelineToml::tiny_latents`]) and set, add or remove
//! keys by their dotted path, so a test says what it changes and nothing breaks when an
//! unrelated line of a base moves.

use toml::{Table, Value};

/// A pipeline document under construction; [`PipelineToml::text`] renders it.
#[derive(Debug, Clone)]
pub struct PipelineToml {
    doc: Table,
}

impl PipelineToml {
    /// `[pipeline] name = "t"` with `seed` and nothing else.
    pub fn new(seed: u64) -> PipelineToml {
        PipelineToml { doc: Table::new() }
            .set("pipeline.name", "t")
            .set("pipeline.seed", seed as i64)
    }

    /// The two-stage base without a model: `caption` of the project's `images/` ("a photo of
    /// zorb star") and `preprocess` at 32 px, seed 1.
    pub fn basic() -> PipelineToml {
        PipelineToml::new(1)
            .stage("caption", "caption", &[])
            .set("stage.caption.images", "images")
            .set("stage.caption.template", "a photo of {token} {class}")
            .set("stage.caption.token", "zorb")
            .set("stage.caption.class", "star")
            .stage("preprocess", "preprocess", &["caption"])
            .set("stage.preprocess.resolution", 32)
    }

    /// The start every training test shares: the tiny fixture model as `base_model`, then
    /// `caption` ("a photo of zorb"), `preprocess` at 16 px and `latents` (encode_latents).
    pub fn tiny_latents(seed: u64) -> PipelineToml {
        let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");
        PipelineToml::new(seed)
            .set("pipeline.base_model", model)
            .stage("caption", "caption", &[])
            .set("stage.caption.images", "images")
            .set("stage.caption.template", "a photo of {token}")
            .set("stage.caption.token", "zorb")
            .stage("preprocess", "preprocess", &["caption"])
            .set("stage.preprocess.resolution", 16)
            .stage("latents", "encode_latents", &["preprocess"])
    }

    /// Adds a `sample_grid` stage `name` on `needs` at the tiny model's scale: "a photo of
    /// zorb", seed 1, 4 DDIM steps, 16×16 px. Tests change what they test with [`Self::set`].
    pub fn tiny_grid(self, name: &str, needs: &[&str]) -> PipelineToml {
        let key = |k: &str| format!("stage.{name}.{k}");
        self.stage(name, "sample_grid", needs)
            .set(&key("prompts"), vec!["a photo of zorb"])
            .set(&key("seeds"), vec![1])
            .set(&key("steps"), 4)
            .set(&key("sampler"), "ddim")
            .set(&key("width"), 16)
            .set(&key("height"), 16)
    }

    /// Adds `[stage.<name>]` with its `kind` and `needs` (left out when empty).
    pub fn stage(self, name: &str, kind: &str, needs: &[&str]) -> PipelineToml {
        let key = format!("stage.{name}");
        let this = self.set(&format!("{key}.kind"), kind);
        if needs.is_empty() {
            this
        } else {
            this.set(&format!("{key}.needs"), needs.to_vec())
        }
    }

    /// Sets the value at a dotted path (`"stage.train.lora.rank"`), creating the tables on the
    /// way; an existing key keeps its place in the file.
    pub fn set(mut self, path: &str, value: impl Into<Value>) -> PipelineToml {
        let (table, last) = Self::parent(&mut self.doc, path);
        table.insert(last.to_string(), value.into());
        self
    }

    /// Merges `fragment` into the document, table by table: what `fragment` sets replaces the
    /// same key, everything else stays. Write fragments with `toml::toml! { [stage.x] … }`.
    pub fn merge(mut self, fragment: Table) -> PipelineToml {
        fn merge_into(into: &mut Table, from: Table) {
            for (key, value) in from {
                match (into.get_mut(&key), value) {
                    (Some(Value::Table(old)), Value::Table(new)) => merge_into(old, new),
                    (_, value) => {
                        into.insert(key, value);
                    }
                }
            }
        }
        merge_into(&mut self.doc, fragment);
        self
    }

    /// Removes the key at a dotted path; panics when it is not there, so a test cannot remove
    /// a key by a misspelled path and test nothing.
    pub fn remove(mut self, path: &str) -> PipelineToml {
        let (table, last) = Self::parent(&mut self.doc, path);
        assert!(table.remove(last).is_some(), "no key `{path}` to remove");
        self
    }

    /// The pipeline file's text.
    pub fn text(&self) -> String {
        toml::to_string(&self.doc).expect("a table of plain values always serialises")
    }

    /// The table holding the last segment of `path`, and that segment.
    fn parent<'t, 'p>(doc: &'t mut Table, path: &'p str) -> (&'t mut Table, &'p str) {
        let mut parts: Vec<&str> = path.split('.').collect();
        let last = parts.pop().expect("split yields at least one part");
        let mut table = doc;
        for part in parts {
            let entry = table
                .entry(part.to_string())
                .or_insert_with(|| Value::Table(Table::new()));
            table = entry
                .as_table_mut()
                .unwrap_or_else(|| panic!("`{part}` in `{path}` is a value, not a table"));
        }
        (table, last)
    }
}

impl std::fmt::Display for PipelineToml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

#[test]
fn builds_the_file_a_person_would_write() {
    let text = PipelineToml::basic()
        .set("stage.preprocess.resolution", 40)
        .stage("train", "train", &["preprocess"])
        .set("stage.train.matrix.method", vec!["lora", "dreambooth"])
        .set("stage.train.lora.rank", 4)
        .remove("stage.caption.class")
        .text();
    let merged = PipelineToml::basic()
        .merge(toml::toml! {
            [stage.preprocess]
            flip = true
            bucket = { min = 16, max = 64 }
        })
        .text();
    let merged: Table = merged.parse().unwrap();
    let preprocess = &merged["stage"]["preprocess"];
    assert_eq!(preprocess["resolution"].as_integer(), Some(32), "kept");
    assert_eq!(preprocess["flip"].as_bool(), Some(true), "added");
    assert_eq!(preprocess["bucket"]["max"].as_integer(), Some(64));
    let parsed: Table = text.parse().unwrap();
    assert_eq!(parsed["pipeline"]["name"].as_str(), Some("t"));
    assert_eq!(
        parsed["stage"]["preprocess"]["resolution"].as_integer(),
        Some(40)
    );
    assert!(parsed["stage"]["caption"].get("class").is_none());
    assert_eq!(
        parsed["stage"]["train"]["matrix"]["method"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    // Stages keep the order they were added in, as in a hand-written file.
    let stages: Vec<&String> = parsed["stage"].as_table().unwrap().keys().collect();
    assert_eq!(stages, ["caption", "preprocess", "train"]);
    assert!(text.contains("[stage.caption]"), "{text}");
}
