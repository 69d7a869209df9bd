//! The sample_grid stage on the tiny fixture model: a labelled grid, PNGs with A1111
//! parameters, per-image caching, and the same pixels as `sdpipe sample` with the same settings.

use crate::common::{PipelineToml, Project};

/// The tiny fixture model (seed 0, the default) and one two-prompt grid over `seeds`.
fn pipeline(seeds: &[i64]) -> PipelineToml {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");
    PipelineToml::new(0)
        .set("pipeline.base_model", model)
        .merge(toml::toml! {
            [stage.grid]
            kind = "sample_grid"
            prompts = ["a photo of sks dog", "a red star"]
            negative_prompt = "blurry"
            steps = 4
            sampler = "euler_a"
            cfg = 7.5
            width = 16
            height = 16
        })
        .set("stage.grid.seeds", seeds.to_vec())
}

#[test]
fn grid_images_are_cached_per_cell_and_match_sdpipe_sample() {
    let p = Project::new(pipeline(&[1, 2]));
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
    p.write_pipeline(pipeline(&[1, 2, 3]));
    assert_eq!(p.status_of("grid").1, "grid.seeds [1,2] → [1,2,3]");
    assert_eq!(p.sdpipe(&["run", "p.toml"]).code, 0);
    assert_eq!(p.stats("grid")["images_computed"], 2);
    assert_eq!(p.stats("grid")["images_reused"], 4);
}

#[test]
fn grid_param_errors_point_at_the_key() {
    let p = Project::new(pipeline(&[1]).set("stage.grid.width", 20));
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("p.toml:13:1")
            && run
                .stderr
                .contains("width = 20 is not a positive multiple of 8"),
        "{}",
        run.stderr
    );
    let p = Project::new(pipeline(&[1]).set("stage.grid.sampler", "heun"));
    let run = p.sdpipe(&["plan", "p.toml"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("unknown variant `heun`"),
        "{}",
        run.stderr
    );
}

/// `precision = "f16"` runs the UNet in mixed precision: the images stay within f16 rounding of
/// the f32 ones (the same seeds and sampler), are not bit-identical, and the cache keys differ.
#[test]
fn half_precision_grid_is_close_to_f32() {
    let f32_run = Project::new(pipeline(&[1]));
    let run = f32_run.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let half_text = pipeline(&[1]).set("pipeline.precision", "f16");
    let half_run = Project::new(&half_text);
    let run = half_run.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    for cell in ["00-1.png", "01-1.png"] {
        let rel = format!("outputs/t/grid/images/base/{cell}");
        let a = image::open(f32_run.path(&rel)).unwrap().to_rgb8();
        let b = image::open(half_run.path(&rel)).unwrap().to_rgb8();
        let diffs: Vec<f64> = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| (*x as f64 - *y as f64).abs())
            .collect();
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let max = diffs.iter().copied().fold(0.0, f64::max);
        println!("{cell}: f16 vs f32 mean |diff| {mean:.2}/255, max {max}/255");
        assert!(mean < 1.5 && max <= 16.0, "{cell}: f16 image far from f32");
    }
}

/// Two runs whose grids overlap (different stage keys, shared cells) sample each shared cell
/// once: the second waits on the cell's lock and uses the first one's image.
#[test]
fn concurrent_overlapping_grids_sample_each_cell_once() {
    let p = Project::new(pipeline(&[1, 2, 3]));
    p.write_pipeline(pipeline(&[1, 2, 3]).set("stage.grid.prompts", vec!["a red star"]));
    let other = pipeline(&[1, 2, 3, 4])
        .set("pipeline.name", "u")
        .set("stage.grid.prompts", vec!["a red star"]);
    std::fs::write(p.path("q.toml"), other.text()).unwrap();
    let env = [("SDPIPE_TEST_ITEM_DELAY_MS", "300")];
    let a = p.spawn(&["run", "p.toml"], &env);
    let b = p.spawn(&["run", "q.toml"], &env);
    let a = a.wait_with_output().unwrap();
    let b = b.wait_with_output().unwrap();
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let computed = |name: &str| {
        let run: serde_json::Value = serde_json::from_slice(
            &std::fs::read(p.path(&format!("outputs/{name}/last-run.json"))).unwrap(),
        )
        .unwrap();
        run["stages"][0]["stats"]["images_computed"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(
        computed("t") + computed("u"),
        4,
        "three shared cells and one of u's own"
    );
    for seed in 1..=3 {
        let cell = format!("images/base/00-{seed}.png");
        assert_eq!(
            std::fs::read(p.path(&format!("outputs/t/grid/{cell}"))).unwrap(),
            std::fs::read(p.path(&format!("outputs/u/grid/{cell}"))).unwrap(),
        );
    }
}
