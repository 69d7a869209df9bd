//! A small synthetic world for the bundled base model, its concept datasets and deterministic
//! quality metrics.
//!
//! - [`scene`]: one object (circle, square, triangle, star) of a palette colour, a size
//!   (small / medium / large) and a position (center or a corner) on a flat background of
//!   another palette colour, and the caption grammar (`a small red star in the top left on a
//!   blue background`) with its parser [`PromptSpec::parse`].
//! - [`render`](mod@render): anti-aliased rendering (4×4 supersampling), deterministic from the scene.
//! - [`concepts`]: what the base world never shows (`heart`, `striped`, `outline`) and their
//!   made-up tokens.
//! - [`detect`](mod@detect): a deterministic detector (background, object, colour, position, size, shape,
//!   stripes, hollowness).
//! - [`quality`]: subject and prompt fidelity of sampled images; the formulas are in its docs.
//!
//! [`base_example`] draws the base world's training examples; [`write_dataset`] is the
//! `sdpipe world` command.

pub mod concepts;
pub mod detect;
pub mod quality;
pub mod render;
pub mod scene;

use std::path::{Path, PathBuf};

use rand::{RngExt, SeedableRng};

pub use concepts::{CONCEPTS, Concept, ConceptKind, concept};
pub use detect::{Detection, ObjectDetection, detect};
pub use quality::{ImageQuality, References, score_image, score_with};
pub use render::render;
pub use scene::{Colour, Fill, Position, PromptSpec, Scene, Shape, Size, Style, TokenUse};

/// Version of the world's rendering, detectors and scores: part of the keys of the stages that
/// score with them (a `report` with a `concept`), so a change of the metrics reruns them. Bump
/// it whenever a detector's or a score's result can change.
pub const VERSION: u32 = 1;

/// Errors of the world generator.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    /// A file or folder could not be written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An image could not be encoded or written.
    #[error("{}: {source}", path.display())]
    Write {
        /// The path.
        path: PathBuf,
        /// What failed.
        source: crate::render::RenderError,
    },
    /// No concept has this name.
    #[error("unknown concept {name:?}; concepts: {}", CONCEPTS.iter().map(|c| c.name).collect::<Vec<_>>().join(", "))]
    UnknownConcept {
        /// The name asked for.
        name: String,
    },
    /// The resolution is outside 8..=1024.
    #[error("resolution {0} is out of range: use 8 to 1024 pixels")]
    Resolution(u32),
}

/// Probability that a caption leaves out the size / position / background (each).
const DROP_P: f64 = 0.3;
/// Probability that a caption leaves out the object's colour.
const DROP_COLOUR_P: f64 = 0.1;

/// One training example of the BASE world (no concept attributes): a random scene drawn
/// deterministically from `seed`, rendered at `resolution` (default world: 64), with its
/// caption. Size, position and background are each left out of the caption with probability
/// 0.3 and the colour with 0.1, so a model learns partial prompts too; the caption never
/// mentions what is not in the image.
pub fn base_example(seed: u64, resolution: u32) -> (image::RgbImage, String) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let scene = Scene::random_base(&mut rng);
    let spec = drop_attributes(scene.full_spec(), &mut rng);
    (render(&scene, resolution), spec.caption(""))
}

/// The scene behind [`base_example`]`(seed, _)`.
pub fn base_scene(seed: u64) -> Scene {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    Scene::random_base(&mut rng)
}

/// Leaves attributes out of a caption at random (never the noun nor the token).
pub(crate) fn drop_attributes(mut spec: PromptSpec, rng: &mut impl RngExt) -> PromptSpec {
    if rng.random_bool(DROP_P) {
        spec.size = None;
    }
    if rng.random_bool(DROP_COLOUR_P) {
        spec.colour = None;
    }
    if rng.random_bool(DROP_P) {
        spec.position = None;
    }
    if rng.random_bool(DROP_P) {
        spec.background = None;
    }
    spec
}

/// One file pair [`write_dataset`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenExample {
    /// The PNG.
    pub image: PathBuf,
    /// The caption sidecar (`.txt`).
    pub caption_file: PathBuf,
    /// The caption.
    pub caption: String,
}

/// Writes `count` examples into `out` (created if missing): `NAME.png` + `NAME.txt` with
/// `NAME = <concept or "world">-<index:03>`, the i-th drawn from seed `seed + i` — base-world
/// examples, or the named concept's. Every file is written atomically.
pub fn write_dataset(
    out: &Path,
    count: usize,
    seed: u64,
    resolution: u32,
    concept_name: Option<&str>,
) -> Result<Vec<WrittenExample>, WorldError> {
    if !(8..=1024).contains(&resolution) {
        return Err(WorldError::Resolution(resolution));
    }
    let concept = match concept_name {
        Some(name) => Some(concept(name).ok_or_else(|| WorldError::UnknownConcept {
            name: name.to_string(),
        })?),
        None => None,
    };
    std::fs::create_dir_all(out).map_err(|source| WorldError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let prefix = concept.map_or("world", |c| c.name);
    let mut written = Vec::with_capacity(count);
    for i in 0..count {
        let s = seed.wrapping_add(i as u64);
        let (img, caption) = match concept {
            Some(c) => c.example(s, resolution),
            None => base_example(s, resolution),
        };
        let name = format!("{prefix}-{i:03}");
        let image = out.join(format!("{name}.png"));
        let caption_file = out.join(format!("{name}.txt"));
        crate::render::write_png_atomic(&image, &img, &[]).map_err(|source| WorldError::Write {
            path: image.clone(),
            source,
        })?;
        crate::render::png_meta::write_atomic(&caption_file, format!("{caption}\n").as_bytes())
            .map_err(|source| WorldError::Write {
                path: caption_file.clone(),
                source,
            })?;
        written.push(WrittenExample {
            image,
            caption_file,
            caption,
        });
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_examples_are_deterministic_and_concept_free() {
        for seed in 0..300 {
            let (img, caption) = base_example(seed, 32);
            let (img2, caption2) = base_example(seed, 32);
            assert_eq!(caption, caption2);
            assert_eq!(img, img2);
            let scene = base_scene(seed);
            assert!(Shape::BASE.contains(&scene.shape));
            assert_eq!(scene.fill, Fill::Solid);
            assert_eq!(scene.style, Style::Filled);
            assert_ne!(scene.colour, scene.background);
            for c in &CONCEPTS {
                assert!(!caption.contains(c.token), "{caption}");
                assert!(!caption.contains(c.name), "{caption}");
            }
            // The caption says only what the scene holds.
            let spec = PromptSpec::parse(&caption, "");
            assert_eq!(spec.shape, Some(scene.shape));
            assert!(spec.colour.is_none_or(|c| c == scene.colour), "{caption}");
            assert!(spec.background.is_none_or(|c| c == scene.background));
            assert!(spec.size.is_none_or(|c| c == scene.size));
            assert!(spec.position.is_none_or(|c| c == scene.position));
        }
        assert_ne!(base_example(1, 32).1, base_example(2, 32).1);
    }
}
