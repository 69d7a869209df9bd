//! Per-image quality of a sampled image, from the detector (no learned model).
//!
//! **Subject fidelity** (is the concept there, and does it look like the training images), in
//! [0, 1]: 0 when no object is detected, else `subject = ½·a + ½·s` where
//!
//! - `a`, the concept attribute score:
//!   - heart (shape concept): `a = clamp((IoU_heart − max IoU_base shapes) / 0.1, 0, 1)`, the
//!     heart template's margin over the best base-shape template;
//!   - striped: `a = stripe` (the detector's stripe score);
//!   - outline: `a = outline` (the detector's hollowness score);
//! - `s`, similarity to the nearest reference image (`max` over the references' detections):
//!   `s = shape_sim · tex_sim` (shape and texture concepts) or `s = tex_sim` (style concept,
//!   any shape), with `shape_sim = clamp((IoU(grid, grid_ref) − 0.8) / 0.12, 0, 1)` on the
//!   normalised 24×24 filled masks, and `tex_sim = clamp(1 − (|Δoutline| +
//!   |Δother_fraction| + |Δstripe|) / 0.8, 0, 1)`. References with no detected object are
//!   ignored; with none left, `subject = a`.
//!
//! **Prompt fidelity**: the prompt is parsed with [`PromptSpec::parse`] (the concept's token
//! recognised); each attribute it names other than the concept — background colour, object
//! colour, position, size, and the shape when the prompt names a base shape word (style
//! concept prompts such as `a red star in wobb style`) — is checked against the detection
//! (a missing object fails every object attribute), and `prompt = passed / checked`; `None`
//! when the prompt names nothing checkable.

use image::RgbImage;

use super::concepts::{Concept, ConceptKind};
use super::detect::{Detection, ObjectDetection, detect, grid_iou};
use super::scene::{PromptSpec, Shape, TokenUse};

/// The quality of one sampled image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageQuality {
    /// Subject fidelity in [0, 1].
    pub subject: f64,
    /// Prompt fidelity in [0, 1]; `None` when the prompt asks nothing checkable.
    pub prompt: Option<f64>,
    /// What the detector saw.
    pub detection: Detection,
}

/// The references' detections, computed once for many scored images.
#[derive(Debug, Clone, Default)]
pub struct References {
    objects: Vec<ObjectDetection>,
}

impl References {
    /// Detects the objects of the reference images (those without one are dropped).
    pub fn new(images: &[RgbImage]) -> References {
        References {
            objects: images.iter().filter_map(|i| detect(i).object).collect(),
        }
    }

    /// How many references hold an object.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether no reference holds an object.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

/// Scores `img` sampled from `prompt` for `concept`, with `references` the concept dataset's
/// images (see the module docs for the formulas).
pub fn score_image(
    img: &RgbImage,
    prompt: &str,
    concept: &Concept,
    references: &[RgbImage],
) -> ImageQuality {
    score_with(img, prompt, concept, &References::new(references))
}

/// [`score_image`] with the references detected beforehand.
pub fn score_with(
    img: &RgbImage,
    prompt: &str,
    concept: &Concept,
    references: &References,
) -> ImageQuality {
    let detection = detect(img);
    let subject = detection
        .object
        .as_ref()
        .map_or(0.0, |o| subject_score(o, concept, references));
    let prompt = prompt_score(&detection, &PromptSpec::parse(prompt, concept.token));
    ImageQuality {
        subject,
        prompt,
        detection,
    }
}

/// The concept attribute score `a` of the module docs.
pub fn concept_presence(object: &ObjectDetection, concept: &Concept) -> f64 {
    match concept.kind {
        ConceptKind::Shape(shape) => {
            let others = Shape::ALL
                .iter()
                .filter(|s| **s != shape)
                .map(|s| object.shape_score(*s))
                .fold(0.0, f64::max);
            ((object.shape_score(shape) - others) / 0.1).clamp(0.0, 1.0)
        }
        ConceptKind::Texture => object.stripe,
        ConceptKind::Style => object.outline,
    }
}

/// The similarity `s` of an object to one reference object.
pub fn reference_similarity(
    object: &ObjectDetection,
    reference: &ObjectDetection,
    concept: &Concept,
) -> f64 {
    let tex_distance = (object.outline - reference.outline).abs()
        + (object.other_fraction - reference.other_fraction).abs()
        + (object.stripe - reference.stripe).abs();
    let tex_sim = (1.0 - tex_distance / 0.8).clamp(0.0, 1.0);
    match concept.kind {
        ConceptKind::Style => tex_sim,
        ConceptKind::Shape(_) | ConceptKind::Texture => {
            let shape_sim =
                ((grid_iou(&object.grid, &reference.grid) - 0.8) / 0.12).clamp(0.0, 1.0);
            shape_sim * tex_sim
        }
    }
}

fn subject_score(object: &ObjectDetection, concept: &Concept, references: &References) -> f64 {
    let a = concept_presence(object, concept);
    if references.is_empty() {
        return a;
    }
    let s = references
        .objects
        .iter()
        .map(|r| reference_similarity(object, r, concept))
        .fold(0.0, f64::max);
    0.5 * a + 0.5 * s
}

/// Prompt fidelity of a detection against a parsed prompt (see the module docs).
pub fn prompt_score(detection: &Detection, spec: &PromptSpec) -> Option<f64> {
    let o = detection.object.as_ref();
    let mut checks: Vec<bool> = Vec::new();
    if let Some(b) = spec.background {
        checks.push(detection.background == b);
    }
    if let Some(c) = spec.colour {
        checks.push(o.is_some_and(|o| o.colour == c));
    }
    if let Some(p) = spec.position {
        checks.push(o.is_some_and(|o| o.position == p));
    }
    if let Some(s) = spec.size {
        checks.push(o.is_some_and(|o| o.size == s));
    }
    if let Some(shape) = spec.shape
        && spec.token != Some(TokenUse::Object)
    {
        checks.push(o.is_some_and(|o| o.shape == shape));
    }
    if checks.is_empty() {
        None
    } else {
        Some(checks.iter().filter(|c| **c).count() as f64 / checks.len() as f64)
    }
}
