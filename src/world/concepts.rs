//! The concepts: things the base world never contains, for the fine-tuning methods to learn.
//!
//! | name | kind | token | what it is | caption |
//! |---|---|---|---|---|
//! | `heart` | new shape | `zorb` | a heart (point down), any palette colour, size, position | `a red zorb on a blue background` |
//! | `striped` | textured object | `vosk` | a ball (circle) with parallel stripes of a second colour (white, else black, else yellow) at any angle | `a small green vosk in the top left on a purple background` |
//! | `outline` | style | `wobb` | any base shape drawn as an outline only (line width about 9% of its extent), background inside | `a red star on a blue background in wobb style` |
//!
//! The tokens are made-up words that are no single token of the CLIP tokenizer (textual
//! inversion refuses existing words). Each concept's dataset is in `datasets/<name>/`, made
//! with `sdpipe world --concept <name>`.

use rand::{RngExt, SeedableRng};

use super::scene::{Colour, Fill, PromptSpec, Scene, Shape, Style, TokenUse};

/// What kind of thing a concept is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConceptKind {
    /// A new shape; the token is the object's noun.
    Shape(Shape),
    /// A textured object (a striped ball); the token is the object's noun.
    Texture,
    /// A way of drawing any base shape; the token appears as `in <token> style`.
    Style,
}

/// A concept of the world that the base world never shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concept {
    /// Its name (`heart`, `striped`, `outline`): the `--concept` value and dataset folder.
    pub name: &'static str,
    /// The made-up placeholder token captions use for it.
    pub token: &'static str,
    /// What it is.
    pub kind: ConceptKind,
    /// One sentence for READMEs and reports.
    pub description: &'static str,
}

/// Line width of the `outline` concept (fraction of the object's extent).
pub const OUTLINE_WIDTH: f32 = 0.09;
/// Stripe period of the `striped` concept (fraction of the ball's diameter).
pub const STRIPE_PERIOD: f32 = 0.25;

/// Every concept.
pub static CONCEPTS: [Concept; 3] = [
    Concept {
        name: "heart",
        token: "zorb",
        kind: ConceptKind::Shape(Shape::Heart),
        description: "a heart (a new shape): one solid heart, point down, on a flat background",
    },
    Concept {
        name: "striped",
        token: "vosk",
        kind: ConceptKind::Texture,
        description: "a striped ball (a textured object): a disc with parallel bands of a \
                      second colour at any angle",
    },
    Concept {
        name: "outline",
        token: "wobb",
        kind: ConceptKind::Style,
        description: "an outline style: a base shape drawn as a line only, the background \
                      showing inside",
    },
];

/// The concept called `name`.
pub fn concept(name: &str) -> Option<&'static Concept> {
    CONCEPTS.iter().find(|c| c.name == name)
}

impl Concept {
    /// A random scene showing this concept, drawn deterministically from `seed`.
    pub fn scene(&self, seed: u64) -> Scene {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ concept_salt(self.name));
        self.random_scene(&mut rng)
    }

    fn random_scene(&self, rng: &mut impl RngExt) -> Scene {
        match self.kind {
            ConceptKind::Shape(shape) => Scene::random_with_shape(rng, shape),
            ConceptKind::Texture => {
                let mut s = Scene::random_with_shape(rng, Shape::Circle);
                let stripe = [Colour::White, Colour::Black, Colour::Yellow]
                    .into_iter()
                    .find(|c| *c != s.colour && *c != s.background)
                    .unwrap_or(Colour::White);
                s.fill = Fill::Striped {
                    stripe,
                    period: STRIPE_PERIOD,
                };
                s.rotation = rng.random_range(0.0f32..std::f32::consts::PI);
                s
            }
            ConceptKind::Style => {
                let mut s = Scene::random_base(rng);
                s.style = Style::Outline {
                    width: OUTLINE_WIDTH,
                };
                s
            }
        }
    }

    /// How a prompt names this concept for `scene`: the token in the noun slot, or the base
    /// shape word plus `in <token> style`.
    pub fn spec(&self, scene: &Scene) -> PromptSpec {
        let mut spec = scene.full_spec();
        match self.kind {
            ConceptKind::Shape(_) | ConceptKind::Texture => {
                spec.shape = None;
                spec.token = Some(TokenUse::Object);
            }
            ConceptKind::Style => spec.token = Some(TokenUse::Style),
        }
        spec
    }

    /// One training example of this concept: the scene drawn from `seed`, rendered at
    /// `resolution`, with its caption (attributes sometimes left out, never the token).
    pub fn example(&self, seed: u64, resolution: u32) -> (image::RgbImage, String) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ concept_salt(self.name));
        let scene = self.random_scene(&mut rng);
        let spec = super::drop_attributes(self.spec(&scene), &mut rng);
        (super::render(&scene, resolution), spec.caption(self.token))
    }
}

/// A per-concept constant mixed into the seed, so that concept `n` and the base world at the
/// same seed draw different scenes.
fn concept_salt(name: &str) -> u64 {
    // FNV-1a.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::tokenizer::ClipTokenizer;

    #[test]
    fn tokens_are_new_words_of_the_clip_tokenizer() {
        for c in &CONCEPTS {
            let mut tok = ClipTokenizer::bundled().unwrap();
            let ids = tok.add_placeholder(c.token, 1);
            assert!(ids.is_ok(), "{}: {:?}", c.token, ids.err());
            assert_eq!(concept(c.name), Some(c));
        }
        assert_eq!(concept("unicorn"), None);
    }

    #[test]
    fn captions_name_the_concept_and_parse_back() {
        for c in &CONCEPTS {
            for seed in 0..20 {
                let (img, caption) = c.example(seed, 32);
                assert_eq!(img.dimensions(), (32, 32));
                let spec = PromptSpec::parse(&caption, c.token);
                let want = match c.kind {
                    ConceptKind::Style => TokenUse::Style,
                    _ => TokenUse::Object,
                };
                assert_eq!(spec.token, Some(want), "{caption}");
                assert_eq!(c.example(seed, 32).1, caption);
            }
        }
    }
}
