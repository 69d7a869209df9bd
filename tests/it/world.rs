//! The synthetic world: detector accuracy on rendered scenes, subject and prompt fidelity on
//! concept / non-concept / degenerate images, the committed concept datasets, and the
//! `sdpipe world` command. Run with `--nocapture` to see the measured figures.

use std::path::{Path, PathBuf};
use std::process::Command;

use image::{Rgb, RgbImage};
use rand::{RngExt, SeedableRng};
use sdpipe::world::{
    CONCEPTS, Colour, PromptSpec, References, base_example, base_scene, concept, detect, render,
    score_with,
};

fn dataset_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("datasets")
        .join(name)
}

/// The committed dataset's images, sorted by name.
fn dataset_images(name: &str) -> Vec<RgbImage> {
    let dir = dataset_dir(name);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| image::open(p).unwrap().to_rgb8())
        .collect()
}

#[test]
fn detector_recovers_rendered_base_scenes() {
    let n = 200;
    let (mut bg, mut colour, mut pos, mut shape, mut size) = (0, 0, 0, 0, 0);
    for seed in 0..n {
        let scene = base_scene(10_000 + seed);
        let d = detect(&render(&scene, 64));
        let o = d.object.as_ref();
        bg += usize::from(d.background == scene.background);
        colour += usize::from(o.is_some_and(|o| o.colour == scene.colour));
        pos += usize::from(o.is_some_and(|o| o.position == scene.position));
        shape += usize::from(o.is_some_and(|o| o.shape == scene.shape));
        size += usize::from(o.is_some_and(|o| o.size == scene.size));
        if o.is_none_or(|o| o.shape != scene.shape || o.colour != scene.colour) {
            println!(
                "seed {seed}: {scene:?} -> {:?}",
                o.map(|o| (o.shape, o.colour))
            );
        }
    }
    let pct = |k: usize| 100.0 * k as f64 / n as f64;
    println!(
        "detection over {n} scenes: background {:.1}%, colour {:.1}%, position {:.1}%, \
         shape {:.1}%, size {:.1}%",
        pct(bg),
        pct(colour),
        pct(pos),
        pct(shape),
        pct(size)
    );
    for (what, k) in [
        ("background", bg),
        ("colour", colour),
        ("position", pos),
        ("shape", shape),
        ("size", size),
    ] {
        assert!(pct(k) >= 95.0, "{what}: {:.1}%", pct(k));
    }
}

#[test]
fn concept_images_score_high_against_their_dataset() {
    for c in &CONCEPTS {
        let refs = References::new(&dataset_images(c.name));
        assert_eq!(refs.len(), 8, "{}: references with an object", c.name);
        let mut scores = Vec::new();
        for seed in 500..540 {
            let (img, caption) = c.example(seed, 64);
            let q = score_with(&img, &caption, c, &refs);
            scores.push(q.subject);
        }
        let min = scores.iter().copied().fold(1.0, f64::min);
        let mean = scores.iter().sum::<f64>() / scores.len() as f64;
        println!(
            "{}: concept renders subject min {min:.3} mean {mean:.3}",
            c.name
        );
        assert!(min >= 0.7, "{}: min subject {min:.3}", c.name);
    }
}

#[test]
fn non_concept_images_score_low() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for c in &CONCEPTS {
        let refs = References::new(&dataset_images(c.name));
        let mut worst: (f64, String) = (0.0, String::new());
        let mut sum = 0.0;
        let n = 150;
        for seed in 0..n {
            let (img, caption) = base_example(20_000 + seed, 64);
            let q = score_with(&img, &caption, c, &refs);
            sum += q.subject;
            if q.subject > worst.0 {
                worst = (q.subject, caption);
            }
        }
        // The other concepts are not this one.
        for other in CONCEPTS.iter().filter(|o| o.name != c.name) {
            for seed in 0..20 {
                let (img, caption) = other.example(seed + 900, 64);
                let q = score_with(&img, &caption, c, &refs);
                if q.subject > worst.0 {
                    worst = (q.subject, format!("{} example: {caption}", other.name));
                }
            }
        }
        for k in 0..10 {
            let flat = RgbImage::from_pixel(64, 64, Rgb(Colour::ALL[k % 8].rgb()));
            let noise = RgbImage::from_fn(64, 64, |_, _| Rgb(rng.random::<[u8; 3]>()));
            for (what, img) in [("flat", flat), ("noise", noise)] {
                let q = score_with(&img, "a red zorb", c, &refs);
                if q.subject > worst.0 {
                    worst = (q.subject, what.to_string());
                }
            }
        }
        println!(
            "{}: non-concept subject mean {:.3} (base world), max {:.3} ({})",
            c.name,
            sum / n as f64,
            worst.0,
            worst.1
        );
        assert!(worst.0 <= 0.3, "{}: {:.3} for {}", c.name, worst.0, worst.1);
    }
}

#[test]
fn prompt_fidelity_follows_the_caption() {
    let c = concept("heart").unwrap();
    let refs = References::default();
    let mut ok = 0;
    let n = 100;
    for seed in 0..n {
        let scene = base_scene(30_000 + seed);
        let img = render(&scene, 64);
        let caption = scene.full_spec().caption("");
        let q = score_with(&img, &caption, c, &refs);
        ok += usize::from(q.prompt == Some(1.0));
        let other = Colour::ALL
            .into_iter()
            .find(|b| *b != scene.background && *b != scene.colour)
            .unwrap();
        let mut wrong = scene.full_spec();
        wrong.background = Some(other);
        let q = score_with(&img, &wrong.caption(""), c, &refs);
        assert!(
            q.prompt.unwrap() < 1.0,
            "{caption} vs {}",
            wrong.caption("")
        );
        let expected = 1.0 - 1.0 / 5.0;
        if ok == seed as usize + 1 {
            assert_eq!(q.prompt, Some(expected), "{}", wrong.caption(""));
        }
    }
    println!("prompt fidelity 1.0 on {ok}/{n} scenes against their own full caption");
    assert!(ok as f64 >= 0.95 * n as f64, "{ok}/{n}");
    // The concept's own captions: the token is no checkable attribute.
    for cpt in &CONCEPTS {
        let refs = References::new(&dataset_images(cpt.name));
        let (img, _) = cpt.example(77, 64);
        let scene = cpt.scene(77);
        let caption = cpt.spec(&scene).caption(cpt.token);
        let q = score_with(&img, &caption, cpt, &refs);
        assert_eq!(q.prompt, Some(1.0), "{caption}");
        assert_eq!(score_with(&img, cpt.token, cpt, &refs).prompt, None);
    }
    // Nothing checkable.
    let img = render(&base_scene(1), 64);
    assert_eq!(score_with(&img, "a zorb", c, &refs).prompt, None);
    assert_eq!(PromptSpec::parse("", "zorb"), PromptSpec::default());
}

/// `blur` rounds of a 3×3 box blur, then uniform noise in ±`noise` per channel: roughly what a
/// tiny diffusion model's blurry, noisy samples look like.
fn degrade(img: &RgbImage, blur: u32, noise: f32, seed: u64) -> RgbImage {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut cur = img.clone();
    for _ in 0..blur {
        let src = cur.clone();
        let (w, h) = src.dimensions();
        cur = RgbImage::from_fn(w, h, |x, y| {
            let mut acc = [0f32; 3];
            let mut n = 0.0;
            for dy in -1i32..=1 {
                for dx in -1i32..=1 {
                    let (nx, ny) = (x as i32 + dx, y as i32 + dy);
                    if nx >= 0 && ny >= 0 && nx < w as i32 && ny < h as i32 {
                        let p = src.get_pixel(nx as u32, ny as u32).0;
                        for k in 0..3 {
                            acc[k] += p[k] as f32;
                        }
                        n += 1.0;
                    }
                }
            }
            Rgb(acc.map(|a| (a / n) as u8))
        });
    }
    RgbImage::from_fn(cur.width(), cur.height(), |x, y| {
        let p = cur.get_pixel(x, y).0;
        Rgb(p.map(|c| (c as f32 + rng.random_range(-noise..=noise)).clamp(0.0, 255.0) as u8))
    })
}

/// On blurred, noisy images the metrics still separate concept from base images.
#[test]
fn metrics_hold_on_degraded_images() {
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    for c in &CONCEPTS {
        let refs = References::new(&dataset_images(c.name));
        let (mut concept_scores, mut base_scores, mut prompts) = (vec![], vec![], vec![]);
        for seed in 0..40u64 {
            let (img, caption) = c.example(seed + 600, 64);
            concept_scores
                .push(score_with(&degrade(&img, 2, 20.0, seed), &caption, c, &refs).subject);
            let scene = base_scene(seed + 700);
            let caption = scene.full_spec().caption("");
            let q = score_with(
                &degrade(&render(&scene, 64), 2, 20.0, seed),
                &caption,
                c,
                &refs,
            );
            base_scores.push(q.subject);
            prompts.push(q.prompt.unwrap());
        }
        let base_max = base_scores.iter().copied().fold(0.0, f64::max);
        println!(
            "{} (blur 2, noise ±20): concept subject mean {:.3}, base subject mean {:.3} max {:.3}, \
             base prompt mean {:.3}",
            c.name,
            mean(&concept_scores),
            mean(&base_scores),
            base_max,
            mean(&prompts)
        );
        assert!(mean(&concept_scores) >= 0.5, "{}", c.name);
        assert!(
            mean(&concept_scores) - mean(&base_scores) >= 0.4,
            "{}",
            c.name
        );
        assert!(base_max <= 0.3, "{}", c.name);
        assert!(mean(&prompts) >= 0.9, "{}", c.name);
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn sdpipe(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_sdpipe"))
        .args(args)
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn world_command_writes_images_and_captions() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w");
    let r = sdpipe(&[
        "world",
        "--out",
        out.to_str().unwrap(),
        "--count",
        "3",
        "--seed",
        "5",
        "--resolution",
        "32",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for i in 0..3 {
        let png = out.join(format!("world-{i:03}.png"));
        let img = image::open(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (32, 32));
        let caption = std::fs::read_to_string(out.join(format!("world-{i:03}.txt"))).unwrap();
        let (want_img, want_caption) = base_example(5 + i, 32);
        assert_eq!(caption.trim_end(), want_caption);
        assert_eq!(img, want_img);
        assert!(r.stdout.contains(&want_caption), "{}", r.stdout);
        assert!(
            r.stdout.contains(&png.display().to_string()),
            "{}",
            r.stdout
        );
    }
    // Unknown concept: usage error naming the concepts.
    let r = sdpipe(&[
        "world",
        "--out",
        out.to_str().unwrap(),
        "--concept",
        "unicorn",
    ]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("unicorn") && r.stderr.contains("heart"),
        "{}",
        r.stderr
    );
    // Output path is a file: the error names it.
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let r = sdpipe(&["world", "--out", file.to_str().unwrap(), "--count", "1"]);
    assert_eq!(r.code, 3);
    assert!(
        r.stderr.contains(&file.display().to_string()),
        "{}",
        r.stderr
    );
}

/// The committed datasets are exactly what their README's command makes.
#[test]
fn committed_datasets_match_the_command() {
    for c in &CONCEPTS {
        let readme = std::fs::read_to_string(dataset_dir(c.name).join("README.md")).unwrap();
        let cmd = format!(
            "sdpipe world --out datasets/{0} --count 8 --seed 0 --resolution 64 --concept {0}",
            c.name
        );
        assert!(readme.contains(&cmd), "{}: README lacks `{cmd}`", c.name);
        assert!(
            readme.contains(c.token),
            "{}: README lacks the token",
            c.name
        );
        let dir = tempfile::tempdir().unwrap();
        let written = sdpipe::world::write_dataset(dir.path(), 8, 0, 64, Some(c.name)).unwrap();
        for w in &written {
            let name = w.image.file_name().unwrap();
            let committed = dataset_dir(c.name).join(name);
            assert_eq!(
                std::fs::read(&committed).unwrap(),
                std::fs::read(&w.image).unwrap(),
                "{}",
                committed.display()
            );
            let txt = dataset_dir(c.name).join(w.caption_file.file_name().unwrap());
            assert_eq!(std::fs::read_to_string(&txt).unwrap().trim_end(), w.caption);
            assert!(w.caption.contains(c.token));
        }
    }
}
