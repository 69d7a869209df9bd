//! The sample_grid stage on the tiny fixture model: a labelled grid, PNGs with A1111
//! parameters, per-image caching, and the same pixels as `sdpipe sample` with the same settings.

mod common;

use common::Project;

fn pipeline(seeds: &str) -> String {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    format!(
        r#"
[pipeline]
name = "t"
base_model = "{fixtures}/tiny-sd"

[stage.grid]
kind = "sample_grid"
prompts = ["a photo of sks dog", "a red star"]
negative_prompt = "blurry"
seeds = {seeds}
steps = 4
sampler = "euler_a"
cfg = 7.5
width = 16
height = 16
"#
    )
}

#[test]
fn grid_images_are_cached_per_cell_and_match_sdpipe_sample() {
    let p = Project::new(&pipeline("[1, 2]"));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(p.stats("grid")["images_computed"], 4);
    let grid = image::open(p.path("outputs/t/grid/grid.png")).unwrap();
    assert!(
        grid.width() > 4 * 16 && grid.height() > 16,
        "grid is {}x{}",
        grid.width(),
        grid.height()
    );

    let cell = p.path("outputs/t/grid/images/base/01-2.png");
    let params = sdpipe::render::png_meta::read_parameters(&cell)
        .unwrap()
        .expect("parameters chunk");
    assert_eq!(params.prompt, "a red star");
    assert_eq!(params.negative_prompt, "blurry");
    assert_eq!(
        (params.steps, params.seed, params.width, params.height),
        (4, 2, 16, 16)
    );
    assert_eq!(params.sampler, "Euler a");

    // The same image from the command line.
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");
    let out = p.path("direct.png");
    let direct = p.sdpipe(&[
        "sample",
        "--model",
        model,
        "--prompt",
        "a red star",
        "--negative",
        "blurry",
        "--steps",
        "4",
        "--sampler",
        "euler_a",
        "--cfg",
        "7.5",
        "--seed",
        "2",
        "--width",
        "16",
        "--height",
        "16",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(direct.code, 0, "{}", direct.stderr);
    let a = image::open(&cell).unwrap().to_rgb8();
    let b = image::open(&out).unwrap().to_rgb8();
    assert_eq!(
        a.as_raw(),
        b.as_raw(),
        "grid cell and `sdpipe sample` differ"
    );

    // One more seed: two new cells (one per prompt), the rest reused.
    p.write_pipeline(&pipeline("[1, 2, 3]"));
    assert_eq!(p.status_of("grid").1, "grid.seeds [1,2] → [1,2,3]");
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);
    assert_eq!(p.stats("grid")["images_computed"], 2);
    assert_eq!(p.stats("grid")["images_reused"], 4);
}

#[test]
fn grid_param_errors_point_at_the_key() {
    let p = Project::new(&pipeline("[1]").replace("width = 16", "width = 20"));
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("p.toml:14:1")
            && run
                .stderr
                .contains("width = 20 is not a positive multiple of 8"),
        "{}",
        run.stderr
    );
    let p = Project::new(&pipeline("[1]").replace("euler_a", "heun"));
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("unknown variant `heun`"),
        "{}",
        run.stderr
    );
}
