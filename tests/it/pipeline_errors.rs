//! A broken pipeline file: exit code 2, `file:line:column` of the offending key, and a fix.

use crate::common::Project;

/// A hand-written pipeline file: the errors below point at its lines and columns, so it stays
/// text (the other tests build theirs with `common::PipelineToml`).
const BASIC: &str = r#"
[pipeline]
name = "t"
seed = 1

[stage.caption]
kind = "caption"
images = "images"
template = "a photo of {token} {class}"
token = "zorb"
class = "star"

[stage.preprocess]
kind = "preprocess"
needs = ["caption"]
resolution = 32
"#;

/// Runs `plan` and `run` on `text`; both must fail with exit 2 at `p.toml:LINE:COL`, and the
/// message must contain every string of `expect`.
fn assert_error(text: &str, line: usize, col: usize, expect: &[&str]) {
    let p = Project::new(text);
    for cmd in ["plan", "run"] {
        let run = p.sdpipe(&[cmd, "p.toml"]);
        assert_eq!(run.code, 2, "`{cmd}` exit code; stderr:\n{}", run.stderr);
        let location = format!("p.toml:{line}:{col}");
        assert!(
            run.stderr.contains(&location),
            "`{cmd}`: expected {location} in:\n{}",
            run.stderr
        );
        for e in expect {
            assert!(
                run.stderr.contains(e),
                "`{cmd}`: expected {e:?} in:\n{}",
                run.stderr
            );
        }
    }
    assert!(!p.path("outputs").exists(), "a failed load wrote outputs");
}

#[test]
fn unknown_key_suggests_the_right_one() {
    let text = BASIC.replace("template = ", "templat = ");
    assert_error(
        &text,
        9,
        1,
        &["unknown key `templat`", "did you mean `template`?"],
    );
}

#[test]
fn unknown_key_in_pipeline_table() {
    let text = BASIC.replace("seed = 1", "sed = 1");
    assert_error(
        &text,
        4,
        1,
        &["[pipeline] unknown key `sed`", "did you mean `seed`?"],
    );
}

#[test]
fn unknown_top_level_table() {
    let text = format!("{BASIC}\n[stages.extra]\nkind = \"caption\"\n");
    assert_error(
        &text,
        18,
        2,
        &["unknown key `stages`", "did you mean `stage`?"],
    );
}

#[test]
fn wrong_type_points_at_the_value() {
    let text = BASIC.replace("resolution = 32", "resolution = \"large\"");
    assert_error(&text, 16, 14, &["invalid type", "expected u32"]);
}

#[test]
fn invalid_enum_value() {
    let text = BASIC.replace("resolution = 32", "resolution = 32\ncrop = \"middle\"");
    assert_error(
        &text,
        17,
        8,
        &["unknown variant `middle`", "center", "random"],
    );
}

#[test]
fn invalid_device_says_what_is_allowed() {
    let text = BASIC.replace("seed = 1", "seed = 1\ndevice = \"gpu\"");
    assert_error(&text, 5, 10, &["unknown device `gpu`", "cuda:N"]);
}

#[test]
fn bf16_is_refused_with_what_exists() {
    let text = BASIC.replace("seed = 1", "seed = 1\nprecision = \"bf16\"");
    assert_error(
        &text,
        5,
        1,
        &[
            "precision \"bf16\" is not available",
            "no bfloat16 kernels",
            "precision = \"f16\"",
        ],
    );
}

#[test]
fn half_precision_pretraining_is_refused_naming_the_stage() {
    let text = "[pipeline]\nname = \"t\"\nseed = 3\nprecision = \"f16\"\n\n[stage.base]\n\
                kind = \"pretrain\"\nresolution = 32\nvae_steps = 8\nunet_steps = 8\n";
    assert_error(
        text,
        4,
        1,
        &[
            "precision \"f16\" is not implemented for stage `base` (pretrain) yet",
            "precision = \"f32\"",
        ],
    );
}

#[test]
fn unknown_stage_in_needs() {
    let text = BASIC.replace("needs = [\"caption\"]", "needs = [\"captoin\"]");
    assert_error(
        &text,
        15,
        10,
        &["needs unknown stage `captoin`", "did you mean `caption`?"],
    );
}

#[test]
fn cycle_names_its_stages() {
    let text = r#"[pipeline]
name = "t"

[stage.a]
kind = "caption"
images = "images"
template = "x"
needs = ["c"]

[stage.b]
kind = "caption"
images = "images"
template = "x"
needs = ["a"]

[stage.c]
kind = "caption"
images = "images"
template = "x"
needs = ["b"]
"#;
    assert_error(text, 8, 9, &["stages form a cycle: a → b → c → a"]);
}

#[test]
fn matrix_over_an_unknown_param() {
    let text = BASIC.replace("resolution = 32", "resolution = 32\nmatrix.rank = [4, 16]");
    assert_error(
        &text,
        17,
        8,
        &["matrix over unknown parameter `rank` of kind `preprocess`"],
    );
}

#[test]
fn matrix_param_also_set_in_the_stage() {
    let text = BASIC.replace(
        "resolution = 32",
        "resolution = 32\nmatrix.resolution = [32, 64]",
    );
    assert_error(
        &text,
        17,
        8,
        &["`resolution` is set both in the stage and in its matrix"],
    );
}

#[test]
fn unknown_kind_suggests() {
    let text = BASIC.replace("kind = \"preprocess\"", "kind = \"preprocesss\"");
    assert_error(
        &text,
        14,
        8,
        &[
            "unknown stage kind `preprocesss`",
            "did you mean `preprocess`?",
        ],
    );
}

#[test]
fn missing_kind() {
    let text = BASIC.replace("kind = \"preprocess\"\n", "");
    assert_error(&text, 13, 8, &["stage `preprocess` has no `kind`"]);
}

#[test]
fn toml_syntax_error() {
    let text = BASIC.replace("resolution = 32", "resolution = = 32");
    assert_error(&text, 16, 14, &[]);
}

#[test]
fn validation_errors_point_at_the_key() {
    let text = BASIC.replace("resolution = 32", "resolution = 30");
    assert_error(
        &text,
        16,
        1,
        &["resolution 30 is not a positive multiple of 8"],
    );
    let text = BASIC.replace("{class}", "{klass}");
    assert_error(
        &text,
        9,
        1,
        &["unknown placeholder {klass}", "did you mean {class}?"],
    );
    let text = BASIC.replace("images = \"images\"", "images = \"no-such-folder\"");
    assert_error(&text, 8, 1, &["no-such-folder does not exist"]);
}

#[test]
fn preprocess_without_a_caption_stage() {
    let text = BASIC.replace("needs = [\"caption\"]\n", "");
    assert_error(&text, 13, 8, &["needs exactly one `caption` stage"]);
}

#[test]
fn usage_errors_exit_2() {
    let p = Project::new(BASIC);
    assert_eq!(p.sdpipe(&["frobnicate"]).code, 2);
    assert_eq!(p.sdpipe(&["run"]).code, 2);
    let missing = p.sdpipe(&["run", "nope.toml"]);
    assert_eq!(missing.code, 2);
    assert!(missing.stderr.contains("nope.toml"), "{}", missing.stderr);
}

/// Values TOML accepts but nothing can train or sample with (`1e30`, `nan`, an empty list) are
/// refused at their key before anything runs, instead of a NaN stop minutes later.
#[test]
fn numbers_that_cannot_train_are_refused_at_their_key() {
    let start = crate::common::PipelineToml::tiny_latents(5).text();
    let train = |extra: &str, table: &str| {
        format!(
            "{start}\n[stage.train]\nkind = \"train\"\nneeds = [\"latents\"]\nmethod = \
             \"lora\"\nsteps = 2\n{extra}\n[stage.train.lora]\n{table}\n"
        )
    };
    // (pipeline, the key's line text, what the message says)
    let cases = [
        (
            train("lr = 1e30", ""),
            "lr = 1e30",
            "beyond any rate that trains",
        ),
        (
            train("lr = nan", ""),
            "lr = nan",
            "must be a positive number",
        ),
        (train("", "alpha = nan"), "alpha = nan", "lora.alpha"),
        (train("", "lr = inf"), "lr = inf", "lora.lr"),
        (
            train("max_grad_norm = -1.0", ""),
            "max_grad_norm = -1.0",
            "must be a finite number ≥ 0",
        ),
        (
            format!(
                "{start}\n[stage.grid]\nkind = \"sample_grid\"\nprompts = [\"a\"]\nseeds = \
                 []\n"
            ),
            "seeds = []",
            "the grid would have no columns",
        ),
    ];
    for (text, key_line, message) in cases {
        let line = text
            .lines()
            .position(|l| l == key_line)
            .unwrap_or_else(|| panic!("{key_line} not in\n{text}"))
            + 1;
        let p = Project::new(&text);
        let run = p.sdpipe(&["plan", "p.toml"]);
        assert_eq!(run.code, 2, "{key_line}: {}", run.stderr);
        for part in [format!("p.toml:{line}:"), message.to_string()] {
            assert!(
                run.stderr.contains(&part),
                "{key_line}: `{part}` in\n{}",
                run.stderr
            );
        }
    }
}
