//! Caption augmentation as kohya sd-scripts does it (`caption_dropout_rate`,
//! `caption_tag_dropout_rate`, `shuffle_caption`, `keep_tokens`, `caption_separator`): each
//! time an item is drawn its caption may be dropped whole (the model then learns the
//! unconditional prediction that classifier-free guidance uses), or split into tags at the
//! separator, the tags after the first `keep_tokens` shuffled and each dropped with a rate,
//! and joined again.
//!
//! Every choice comes from the generator the batch draw hands in, seeded by the pipeline
//! seed, the step and the micro-batch, so reruns and resumed runs see the same captions.

use rand::{Rng, RngExt};

/// How captions change each time an item is drawn. The default changes nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionShaping {
    /// Probability that a drawn caption is replaced by the empty caption (kohya's
    /// `caption_dropout_rate`).
    pub dropout: f64,
    /// Probability that each tag after the first `keep_tokens` is left out (kohya's
    /// `caption_tag_dropout_rate`).
    pub tag_dropout: f64,
    /// Shuffle the tags after the first `keep_tokens` (kohya's `shuffle_caption`).
    pub shuffle: bool,
    /// Leading tags that stay first and are never dropped, e.g. the trigger word (kohya's
    /// `keep_tokens`).
    pub keep_tokens: usize,
    /// What separates tags (kohya's `caption_separator`, default `,`).
    pub separator: String,
}

impl Default for CaptionShaping {
    fn default() -> Self {
        Self {
            dropout: 0.0,
            tag_dropout: 0.0,
            shuffle: false,
            keep_tokens: 0,
            separator: ",".into(),
        }
    }
}

impl CaptionShaping {
    /// Whether every caption is used as written (no generator draw is made then).
    pub fn is_identity(&self) -> bool {
        self.dropout == 0.0 && self.tag_dropout == 0.0 && !self.shuffle
    }

    /// The caption to train on this time for `caption`. As kohya: first the whole-caption
    /// dropout, then the tags (trimmed) after the first `keep_tokens` are shuffled and each
    /// dropped with `tag_dropout`, and the tags are joined with `", "` (kohya joins so whatever
    /// the separator).
    pub fn apply(&self, caption: &str, rng: &mut impl Rng) -> String {
        if self.is_identity() {
            return caption.to_string();
        }
        if self.dropout > 0.0 && rng.random_bool(self.dropout.min(1.0)) {
            return String::new();
        }
        if !self.shuffle && self.tag_dropout == 0.0 {
            return caption.to_string();
        }
        let tags: Vec<&str> = caption
            .trim()
            .split(self.separator.as_str())
            .map(str::trim)
            .collect();
        let keep = self.keep_tokens.min(tags.len());
        let (fixed, flex) = tags.split_at(keep);
        let mut flex = flex.to_vec();
        if self.shuffle {
            // Fisher–Yates from the back, as `random.shuffle` does.
            for i in (1..flex.len()).rev() {
                let j = rng.random_range(0..=i);
                flex.swap(i, j);
            }
        }
        if self.tag_dropout > 0.0 {
            let rate = self.tag_dropout.min(1.0);
            flex.retain(|_| !rng.random_bool(rate));
        }
        fixed
            .iter()
            .chain(&flex)
            .copied()
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    const CAPTION: &str = "zorb, red, heart, shiny, centered, plain background";

    #[test]
    fn the_default_changes_nothing() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let s = CaptionShaping::default();
        assert!(s.is_identity());
        assert_eq!(s.apply(CAPTION, &mut rng), CAPTION);
    }

    #[test]
    fn shuffling_keeps_the_leading_tags_and_every_tag() {
        let s = CaptionShaping {
            shuffle: true,
            keep_tokens: 1,
            ..CaptionShaping::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let c = s.apply(CAPTION, &mut rng);
            assert!(c.starts_with("zorb, "), "{c}");
            let mut tags: Vec<&str> = c.split(", ").collect();
            tags.sort();
            let mut want: Vec<&str> = CAPTION.split(", ").collect();
            want.sort();
            assert_eq!(tags, want);
            seen.insert(c);
        }
        assert!(seen.len() > 10, "only {} orders in 50 draws", seen.len());
        // Same seed, same captions.
        let mut a = ChaCha8Rng::seed_from_u64(9);
        let mut b = ChaCha8Rng::seed_from_u64(9);
        assert_eq!(s.apply(CAPTION, &mut a), s.apply(CAPTION, &mut b));
    }

    #[test]
    fn dropout_empties_about_its_share_of_captions() {
        let s = CaptionShaping {
            dropout: 0.25,
            ..CaptionShaping::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let empty = (0..4000)
            .filter(|_| s.apply(CAPTION, &mut rng).is_empty())
            .count();
        // Binomial(4000, 0.25): mean 1000, sd ≈ 27.
        assert!((880..=1120).contains(&empty), "{empty} of 4000");
    }

    #[test]
    fn tag_dropout_never_drops_kept_tags_and_other_separators_split() {
        let s = CaptionShaping {
            tag_dropout: 0.5,
            keep_tokens: 2,
            separator: "|".into(),
            ..CaptionShaping::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut lengths = std::collections::HashSet::new();
        for _ in 0..200 {
            let c = s.apply("a | b | c | d | e", &mut rng);
            assert!(c.starts_with("a, b"), "{c}");
            lengths.insert(c.split(", ").count());
        }
        assert!(lengths.contains(&2) && lengths.contains(&5), "{lengths:?}");
    }
}
