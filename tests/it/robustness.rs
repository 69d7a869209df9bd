//! Bad images, failures, kills and concurrent runs: errors name the file, nothing is lost,
//! and the cache stays consistent.

use std::time::Duration;

use crate::common::{PipelineToml, Project, count_files, wait_for};

#[test]
fn corrupt_image_is_named_and_fails_the_stage() {
    let p = Project::new(PipelineToml::basic());
    std::fs::write(
        p.path("images/broken.png"),
        b"\x89PNG\r\n\x1a\nthis is not really a png",
    )
    .unwrap();
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("broken.png"), "{}", run.stdout);
    assert!(
        run.stdout.contains("corrupt or unreadable image"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("on_bad_image = \"skip\""),
        "the fix is suggested: {}",
        run.stdout
    );
    assert_eq!(p.outcome("caption"), "computed");
    assert_eq!(p.outcome("preprocess"), "failed");
    let (status, reason) = p.status_of("preprocess");
    assert_eq!(status, "failed");
    assert!(reason.contains("broken.png"), "{reason}");

    // Skipping reports it and keeps the rest.
    p.write_pipeline(PipelineToml::basic().set("stage.preprocess.on_bad_image", "skip"));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(p.stats("preprocess")["skipped"], 1);
    assert!(run.stdout.contains("1 skipped"), "{}", run.stdout);
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(p.path("outputs/t/preprocess/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["skipped"][0][0], "broken.png");
}

#[test]
fn too_small_image_is_named() {
    let p = Project::new(PipelineToml::basic());
    image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]))
        .save(p.path("images/tiny.png"))
        .unwrap();
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stdout
            .contains("tiny.png: image is 8x8, smaller than the minimum 16 px"),
        "{}",
        run.stdout
    );
}

#[test]
fn missing_captions_list_the_files() {
    let text = PipelineToml::basic().remove("stage.caption.template");
    let p = Project::new(&text);
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 1);
    assert!(run.stdout.contains("2 image(s)"), "{}", run.stdout);
    assert!(
        run.stdout.contains("zorb-03.png") && run.stdout.contains("zorb-05.jpg"),
        "{}",
        run.stdout
    );
    assert_eq!(p.outcome("preprocess"), "skipped");
}

/// After the stages `start` already has (none, or stages a test puts first): a `good` caption →
/// preprocess branch and a `bad` one whose captions are missing (no template).
fn branches(start: PipelineToml) -> PipelineToml {
    start.merge(toml::toml! {
        [stage.good]
        kind = "caption"
        images = "images"
        template = "ok"

        [stage.good_pre]
        kind = "preprocess"
        needs = ["good"]
        resolution = 32

        [stage.bad]
        kind = "caption"
        images = "images"

        [stage.bad_pre]
        kind = "preprocess"
        needs = ["bad"]
        resolution = 32
    })
}

#[test]
fn a_failure_skips_only_its_dependents() {
    let p = Project::new(branches(PipelineToml::new(0)));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 1);
    assert_eq!(p.outcome("good"), "computed");
    assert_eq!(p.outcome("good_pre"), "computed");
    assert_eq!(p.outcome("bad"), "failed");
    assert_eq!(p.outcome("bad_pre"), "skipped");
    assert!(run.stdout.contains("error in stage bad"), "{}", run.stdout);
}

#[test]
fn fail_fast_stops_at_the_first_failure() {
    // `bad` comes first in this file, so fail-fast never starts the good branch.
    let text = branches(
        PipelineToml::new(0)
            .stage("bad0", "caption", &[])
            .set("stage.bad0.images", "images"),
    );
    let p = Project::new(&text);
    let run = p.sdpipe(&["run", "p.toml", "--fail-fast"]);
    assert_eq!(run.code, 1);
    assert_eq!(p.outcome("bad0"), "failed");
    assert_eq!(p.outcome("good"), "notrun");
}

#[test]
fn kill_during_a_stage_then_rerun_gives_the_right_result() {
    // Reference: an uninterrupted run in its own project.
    let reference = Project::new(PipelineToml::basic());
    assert_eq!(reference.sdpipe(&["run", "p.toml"]).code, 0);
    let expected =
        std::fs::read_to_string(reference.path("outputs/t/preprocess/manifest.json")).unwrap();

    let p = Project::new(PipelineToml::basic());
    let mut child = p.spawn(
        &["run", "p.toml"],
        &[
            ("SDPIPE_TEST_ITEM_DELAY_MS", "400"),
            ("RAYON_NUM_THREADS", "1"),
        ],
    );
    let items = p.path(".sdpipe/cache-v1/records/items");
    wait_for("the first preprocessed item", || count_files(&items) >= 2);
    child.kill().unwrap(); // SIGKILL: no cleanup runs
    child.wait().unwrap();
    let stages = p.path(".sdpipe/cache-v1/records/stages");
    assert_eq!(
        count_files(&stages),
        1,
        "only the caption stage was committed"
    );

    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(p.outcome("caption"), "cached");
    assert_eq!(p.outcome("preprocess"), "computed");
    let reused = p.stats("preprocess")["images_reused"].as_u64().unwrap();
    assert!(reused >= 1, "items finished before the kill are reused");
    let got = std::fs::read_to_string(p.path("outputs/t/preprocess/manifest.json")).unwrap();
    assert!(
        got == expected,
        "the resumed result differs from an uninterrupted run"
    );
    let verify = p.sdpipe(&["cache", "verify"]);
    assert_eq!(verify.code, 0, "{}", verify.stdout);
}

#[test]
fn two_concurrent_runs_compute_each_stage_once() {
    let p = Project::new(PipelineToml::basic());
    let env = [
        ("SDPIPE_TEST_ITEM_DELAY_MS", "150"),
        ("RAYON_NUM_THREADS", "1"),
    ];
    let a = p.spawn(&["run", "p.toml"], &env);
    std::thread::sleep(Duration::from_millis(100));
    let b = p.spawn(&["run", "p.toml"], &env);
    let a = a.wait_with_output().unwrap();
    let b = b.wait_with_output().unwrap();
    assert!(a.status.success() && b.status.success());
    let outs = [
        String::from_utf8_lossy(&a.stdout).into_owned(),
        String::from_utf8_lossy(&b.stdout).into_owned(),
    ];
    let computed = outs
        .iter()
        .filter(|o| o.contains("preprocess  computed"))
        .count();
    let cached = outs
        .iter()
        .filter(|o| o.contains("preprocess  cached"))
        .count();
    assert_eq!((computed, cached), (1, 1), "{outs:?}");
    let errs =
        String::from_utf8_lossy(&a.stderr).into_owned() + &String::from_utf8_lossy(&b.stderr);
    assert!(
        errs.contains("waiting for stage"),
        "the waiting run says what it waits for: {errs}"
    );
    assert_eq!(p.sdpipe(&["cache", "verify"]).code, 0);
}

#[test]
fn ctrl_c_stops_cleanly_with_exit_130() {
    let p = Project::new(PipelineToml::basic());
    let child = p.spawn(
        &["run", "p.toml"],
        &[
            ("SDPIPE_TEST_ITEM_DELAY_MS", "300"),
            ("RAYON_NUM_THREADS", "1"),
        ],
    );
    let items = p.path(".sdpipe/cache-v1/records/items");
    wait_for("the first preprocessed item", || count_files(&items) >= 1);
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(p.outcome("preprocess"), "cancelled");
    assert_eq!(p.sdpipe(&["cache", "verify"]).code, 0);
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0);
    assert!(p.stats("preprocess")["images_reused"].as_u64().unwrap() >= 1);
}

/// A PNG of the given size with one tiny IDAT: what a decompression bomb's header looks like.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    // zlib stream of one stored empty block
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x01, 0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 1],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

/// A header claiming 100000x100000 used to abort the process allocating 30 GB, even with
/// `on_bad_image = "skip"`; a truncated JPEG decoded silently to grey. Both are bad images now.
#[test]
fn a_decompression_bomb_and_a_truncated_jpeg_are_bad_images() {
    let p = Project::new(PipelineToml::basic());
    std::fs::write(p.path("images/bomb.png"), png_claiming(100_000, 100_000)).unwrap();
    let jpeg = std::fs::read(p.path("images/zorb-05.jpg")).unwrap();
    std::fs::write(p.path("images/cut.jpg"), &jpeg[..jpeg.len() * 2 / 3]).unwrap();
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    for part in ["bomb.png", "claims 100000x100000", "cut.jpg"] {
        assert!(run.stdout.contains(part), "`{part}` in\n{}", run.stdout);
    }

    p.write_pipeline(PipelineToml::basic().set("stage.preprocess.on_bad_image", "skip"));
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(p.stats("preprocess")["skipped"], 2);
    // the intact JPEG still decodes (strict mode refuses only what is broken)
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(p.path("outputs/t/preprocess/manifest.json")).unwrap(),
    )
    .unwrap();
    let names: Vec<&str> = manifest["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"zorb-05.jpg"), "{names:?}");
}

/// With `recursive = true`, `a/x.png` and `a__x.png` are two items with two output files (both
/// used to be written to `a__x.png.safetensors`, one lost).
#[test]
fn nested_and_flat_names_do_not_collide() {
    let text = PipelineToml::basic().set("stage.caption.recursive", true);
    let p = Project::new(&text);
    std::fs::create_dir_all(p.path("images/a")).unwrap();
    std::fs::copy(p.path("images/zorb-01.png"), p.path("images/a/x.png")).unwrap();
    std::fs::copy(p.path("images/zorb-03.png"), p.path("images/a__x.png")).unwrap();
    let run = p.sdpipe(&["run", "p.toml"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let items = p.path("outputs/t/preprocess/items");
    let nested = std::fs::read(items.join("a/x.png.safetensors")).unwrap();
    let flat = std::fs::read(items.join("a__x.png.safetensors")).unwrap();
    assert_ne!(nested, flat, "two images, two tensors");
}
