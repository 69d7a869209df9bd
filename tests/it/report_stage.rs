//! The `report` stage on the tiny fixture model: two methods and a merge, a grid and the
//! report; the HTML is self-contained and has a row per grid variant, the JSON carries the
//! train records' figures, the SVG is well-formed, and `run` says where the page is.

use crate::common::{PipelineToml, Project};

fn pipeline(concept: &str) -> PipelineToml {
    PipelineToml::tiny_latents(3)
        .merge(toml::toml! {
            [stage.train]
            kind = "train"
            needs = ["latents"]
            matrix.method = ["lora", "textual_inversion"]
            steps = 12
            lr = 1e-3

            [stage.train.lora]
            rank = 2

            [stage.train.textual_inversion]
            token = "zorb"
            init_word = "star"

            [stage.merged]
            kind = "merge"
            needs = ["train@method=lora"]
            mode = "lora_into_checkpoint"
            loras = ["train@method=lora"]

            [stage.report]
            kind = "report"
            needs = ["train", "merged", "grid", "preprocess"]
            title = "Two <methods> & a merge"
        })
        .tiny_grid("grid", &["train", "merged"])
        .set(
            "stage.grid.prompts",
            vec!["a photo of zorb", "a zorb on a blue background"],
        )
        .set("stage.grid.steps", 2)
        .set("stage.report.concept", concept)
}

/// Checks that `svg` is a well-formed XML element tree with an `<svg>` root: every tag closes
/// in order, attribute quotes balance, nothing but whitespace lies outside the root.
fn assert_well_formed_svg(svg: &str) {
    let body = svg.trim();
    let body = match body.strip_prefix("<?xml") {
        Some(rest) => {
            rest.split_once("?>")
                .expect("unterminated XML declaration")
                .1
        }
        None => body,
    }
    .trim();
    assert!(
        body.starts_with("<svg"),
        "root is not <svg>: {}",
        &body[..40.min(body.len())]
    );
    let mut stack: Vec<String> = Vec::new();
    let mut rest = body;
    let mut closed_root = false;
    while let Some(open) = rest.find('<') {
        assert!(!closed_root, "content after the root element");
        let text = &rest[..open];
        assert!(!text.contains('>'), "stray '>' in text {text:?}");
        let after = &rest[open + 1..];
        if let Some(c) = after.strip_prefix("!--") {
            rest = &c[c.find("-->").expect("unterminated comment") + 3..];
            continue;
        }
        // the tag runs to the first '>' outside quotes
        let mut quote = None;
        let mut end = None;
        for (i, ch) in after.char_indices() {
            match (quote, ch) {
                (None, '"' | '\'') => quote = Some(ch),
                (Some(q), c) if c == q => quote = None,
                (None, '>') => {
                    end = Some(i);
                    break;
                }
                (None, '<') => panic!("'<' inside a tag: {}", &after[..i]),
                _ => {}
            }
        }
        let end = end.expect("unterminated tag");
        let tag = &after[..end];
        if let Some(name) = tag.strip_prefix('/') {
            let top = stack
                .pop()
                .unwrap_or_else(|| panic!("</{name}> closes nothing"));
            assert_eq!(top, name.trim(), "mismatched closing tag");
            closed_root = stack.is_empty();
        } else {
            let name: String = tag
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '/')
                .collect();
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_alphanumeric() || "-_:".contains(c)),
                "bad tag name in <{tag}>"
            );
            if !tag.ends_with('/') {
                stack.push(name);
            } else if stack.is_empty() {
                closed_root = true;
            }
        }
        rest = &after[end + 1..];
    }
    assert!(stack.is_empty(), "unclosed elements: {stack:?}");
    assert!(closed_root, "no root element");
    assert!(rest.trim().is_empty(), "trailing text {rest:?}");
}

#[test]
fn report_is_self_contained_and_carries_every_variant() {
    let p = Project::new(pipeline("heart"));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains(&format!(
            "report: {}",
            std::path::Path::new("outputs/t/report/report.html").display()
        )),
        "run does not say where the report is:\n{}",
        run.stdout
    );

    let dir = p.path("outputs/t/report");
    for file in [
        "report.html",
        "report.md",
        "report.json",
        "grid.png",
        "loss.svg",
    ] {
        assert!(dir.join(file).is_file(), "missing {file}");
    }
    let grid: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.path("outputs/t/grid/manifest.json")).unwrap())
            .unwrap();
    let variants: Vec<String> = grid["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        variants,
        [
            "base",
            "train@method=lora",
            "train@method=textual_inversion",
            "merged"
        ]
    );
    assert_eq!(
        std::fs::read(dir.join("grid.png")).unwrap(),
        std::fs::read(p.path("outputs/t/grid/grid.png")).unwrap()
    );

    // HTML: no URL at all, images only as data: URIs, a table row per variant, inline SVG.
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "URL in the HTML"
    );
    assert!(!html.contains("href="), "link in the HTML");
    let sources: Vec<&str> = html.split("src=\"").skip(1).collect();
    assert!(!sources.is_empty(), "no image in the HTML");
    for s in sources {
        assert!(
            s.starts_with("data:image/png;base64,"),
            "external source: {}",
            &s[..40.min(s.len())]
        );
    }
    assert!(html.contains("<svg"), "no inline plot");
    assert!(html.contains("<title>Two &lt;methods&gt; &amp; a merge</title>"));
    for v in &variants {
        assert!(
            html.contains(&format!("<tr data-variant=\"{v}\">"))
                || html.contains(&format!("<tr class=\"base\" data-variant=\"{v}\">")),
            "no table row for {v}"
        );
    }
    for column in [
        "Training time",
        "Steps/s",
        "Peak memory",
        "Artifact",
        "Final loss",
        "Subject fidelity",
        "Prompt fidelity",
    ] {
        assert!(
            html.contains(&format!("<th>{column}</th>")),
            "no column {column}"
        );
    }
    assert!(html.contains("Provenance") && html.contains("dfdx"));

    // JSON: one entry per variant, the train records' figures, per-image scores.
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    let entries = json["variants"].as_array().unwrap();
    assert_eq!(entries.len(), variants.len());
    for (entry, name) in entries.iter().zip(&variants) {
        assert_eq!(entry["name"], name.as_str());
        let images = entry["images"].as_array().unwrap();
        assert_eq!(images.len(), 2, "{name}: one image per prompt × seed");
        assert!(
            images.iter().all(|i| i["subject"].is_f64()),
            "{name}: unscored image"
        );
        let q = &entry["quality"];
        assert!(q["subject"].is_f64() && q["images"] == 2, "{name}: {q}");
        if name.starts_with("train@") {
            let stats = p.stats(name);
            let t = &entry["training"];
            for field in [
                "wall_s",
                "steps_per_s",
                "peak_memory_mib",
                "artifact_bytes",
                "train_loss_last",
                "eval_loss_before",
                "eval_loss_after",
                "trainable_params",
            ] {
                // f32 figures: the record went through f64, the report was written as f32
                let (a, b) = (t[field].as_f64().unwrap(), stats[field].as_f64().unwrap());
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "{name}: {field} {a} in the report, {b} in the record"
                );
            }
            assert_eq!(entry["artifact"]["bytes"], stats["artifact_bytes"]);
            assert_eq!(entry["loss"].as_array().unwrap().len(), 12);
            assert_eq!(entry["stage_kind"], "train");
        }
    }
    assert_eq!(entries[0]["method"], "base model");
    assert!(entries[0]["training"].is_null());
    assert_eq!(entries[1]["method"], "LoRA");
    assert_eq!(entries[2]["method"], "Textual Inversion");
    assert_eq!(entries[3]["stage_kind"], "merge");
    assert_eq!(entries[3]["sources"][0], "train@method=lora");
    assert_eq!(entries[3]["artifact"]["file"], "model.safetensors");
    let prov = &json["provenance"];
    assert_eq!(prov["pipeline"], "t");
    assert_eq!(prov["dfdx_version"], "0.13.0");
    assert!(
        prov["base_model_hash"]
            .as_str()
            .is_some_and(|h| h.len() == 64)
    );
    assert!(
        prov["stages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "grid" && s["key"].as_str().is_some_and(|k| k.len() == 64))
    );

    // Markdown: the same table, the grid and plot by reference.
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains("![sample grid](grid.png)") && md.contains("(loss.svg)"));
    for v in &variants {
        assert!(md.contains(&format!("| {v} |")), "no Markdown row for {v}");
    }

    // SVG: well-formed, a raw and a smoothed line per method.
    let svg = std::fs::read_to_string(dir.join("loss.svg")).unwrap();
    assert_well_formed_svg(&svg);
    assert!(svg.matches("<polyline").count() >= 4);
    assert!(svg.contains("train@method=lora") && svg.contains("train@method=textual_inversion"));

    // A rerun takes the report from the cache and still says where it is.
    let again = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(p.outcome("report"), "cached");
    assert!(
        again
            .stdout
            .contains("report: outputs/t/report/report.html")
    );
}

#[test]
fn unknown_concept_is_an_error_at_the_key() {
    let text = pipeline("hart").text();
    let line = text
        .lines()
        .position(|l| l.starts_with("concept ="))
        .unwrap()
        + 1;
    let p = Project::new(&text);
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!("p.toml:{line}:")),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("unknown concept `hart`"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("did you mean `heart`?"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("known concepts:"), "{}", run.stderr);
}

#[test]
fn a_report_needs_one_sample_grid() {
    let text = pipeline("heart").set("stage.report.needs", vec!["train", "preprocess"]);
    let p = Project::new(&text);
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("exactly one `sample_grid`"),
        "{}",
        run.stderr
    );
}

/// A train stage's EMA and saved steps are report lines of their own beside its final weights:
/// each names its artifact; the run's figures (and its validation loss, which the loss plot
/// draws) stay on the final line.
#[test]
fn ema_and_saved_steps_are_report_lines() {
    let p = Project::new(
        pipeline("heart")
            .set("stage.train.ema_decay", 0.9)
            .set("stage.train.save_every", 6)
            .set("stage.train.validation_split", 0.3)
            .set("stage.train.validate_every", 6),
    );
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.path("outputs/t/report/report.json")).unwrap())
            .unwrap();
    let variants = report["variants"].as_array().unwrap();
    let line = |name: &str| {
        variants
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no line {name}: {variants:?}"))
    };
    let ema = line("train@method=lora#ema");
    assert!(ema["method"].as_str().unwrap().contains("EMA"), "{ema}");
    assert_eq!(ema["artifact"]["file"], "ema/lora.safetensors");
    assert!(ema["training"].is_null());
    let step = line("train@method=textual_inversion#step=6");
    assert!(
        step["method"].as_str().unwrap().contains("step 6"),
        "{step}"
    );
    assert_eq!(step["artifact"]["file"], "step=6/embedding.safetensors");
    let lora = line("train@method=lora");
    assert!(!lora["training"].is_null());
    // the validation loss before training and after steps 6 and 12, plotted beside the loss
    assert_eq!(lora["validation"].as_array().unwrap().len(), 3, "{lora}");
    let svg = std::fs::read_to_string(p.path("outputs/t/report/loss.svg")).unwrap();
    assert!(svg.contains("train@method=lora (validation)"));
}

/// Train stages of one method that differ in their options say how, in the method column:
/// each lists the keys whose values differ from the others'.
#[test]
fn the_report_says_what_each_train_stage_of_a_method_changed() {
    let p = Project::new(
        PipelineToml::tiny_latents(3)
            .merge(toml::toml! {
                [stage.plain]
                kind = "train"
                needs = ["latents"]
                method = "lora"
                steps = 4

                [stage.weighted]
                kind = "train"
                needs = ["latents"]
                method = "lora"
                steps = 4
                min_snr_gamma = 5.0
                optimizer = "lion"

                [stage.report]
                kind = "report"
                needs = ["plain", "weighted", "grid", "preprocess"]
            })
            .tiny_grid("grid", &["plain", "weighted"])
            .set("stage.grid.steps", 2),
    );
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.path("outputs/t/report/report.json")).unwrap())
            .unwrap();
    let settings = |name: &str| {
        report["variants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()["settings"]
            .clone()
    };
    assert_eq!(
        settings("weighted"),
        serde_json::json!(["min_snr_gamma=5.0", "optimizer=lion"])
    );
    assert!(settings("plain").is_null(), "{}", settings("plain"));
    let md = std::fs::read_to_string(p.path("outputs/t/report/report.md")).unwrap();
    assert!(
        md.contains("LoRA · min_snr_gamma=5.0, optimizer=lion"),
        "{md}"
    );
}
