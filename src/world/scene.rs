//! What a scene holds (one object on a flat background), the caption grammar and its parser.
//!
//! Captions follow one grammar:
//!
//! ```text
//! a|an [SIZE] [COLOUR] NOUN [in the POSITION] [on a|an BACKGROUND background] [in TOKEN style]
//! ```
//!
//! where NOUN is a shape word (`circle`, `square`, `triangle`, `star`) or a concept token, SIZE
//! is `small` / `medium` / `large`, POSITION is `center` / `top left` / `top right` /
//! `bottom left` / `bottom right`, and COLOUR / BACKGROUND are palette names.

use std::fmt;

use rand::RngExt;

/// A shape the renderer can draw. The base world draws only [`Shape::BASE`]; the heart is a
/// concept (see [`crate::world::concepts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// A disc.
    Circle,
    /// An axis-aligned square (up to the rotation jitter).
    Square,
    /// An equilateral triangle pointing up.
    Triangle,
    /// A five-pointed star, one point up.
    Star,
    /// A heart, point down (concept only).
    Heart,
}

impl Shape {
    /// The shapes of the base world.
    pub const BASE: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star];
    /// Every shape the detector knows (the base shapes and the heart).
    pub const ALL: [Shape; 5] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Star,
        Shape::Heart,
    ];

    /// The caption word.
    pub fn word(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Heart => "heart",
        }
    }

    /// The shape a caption word names.
    pub fn from_word(word: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|s| s.word() == word)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

/// A colour of the fixed palette (saturated, pairwise far apart in RGB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Colour {
    /// (220, 40, 40)
    Red,
    /// (40, 170, 60)
    Green,
    /// (40, 80, 220)
    Blue,
    /// (245, 215, 40)
    Yellow,
    /// (140, 50, 180)
    Purple,
    /// (245, 130, 20)
    Orange,
    /// (245, 245, 245)
    White,
    /// (20, 20, 20)
    Black,
}

impl Colour {
    /// The palette.
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
        Colour::White,
        Colour::Black,
    ];

    /// The caption word.
    pub fn word(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
            Colour::White => "white",
            Colour::Black => "black",
        }
    }

    /// The colour a caption word names.
    pub fn from_word(word: &str) -> Option<Colour> {
        Colour::ALL.into_iter().find(|c| c.word() == word)
    }

    /// The RGB value the renderer paints.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 40, 40],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [40, 80, 220],
            Colour::Yellow => [245, 215, 40],
            Colour::Purple => [140, 50, 180],
            Colour::Orange => [245, 130, 20],
            Colour::White => [245, 245, 245],
            Colour::Black => [20, 20, 20],
        }
    }

    /// The palette colour nearest to `rgb` (Euclidean distance in RGB).
    pub fn nearest(rgb: [f32; 3]) -> Colour {
        let mut best = (f32::INFINITY, Colour::Black);
        for c in Colour::ALL {
            let d = rgb_distance(rgb, c.rgb().map(f32::from));
            if d < best.0 {
                best = (d, c);
            }
        }
        best.1
    }
}

impl fmt::Display for Colour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

/// Euclidean distance of two RGB colours (0–255 per channel).
pub(crate) fn rgb_distance(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

/// The object's size: the longer side of its bounding box as a fraction of the image side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Size {
    /// About 0.28 of the image side.
    Small,
    /// About 0.44 of the image side.
    Medium,
    /// About 0.62 of the image side.
    Large,
}

impl Size {
    /// All sizes.
    pub const ALL: [Size; 3] = [Size::Small, Size::Medium, Size::Large];
    /// Boundaries between small/medium and medium/large (bounding-box extent / image side).
    pub const THRESHOLDS: [f32; 2] = [0.36, 0.53];

    /// The caption word.
    pub fn word(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Medium => "medium",
            Size::Large => "large",
        }
    }

    /// The size a caption word names.
    pub fn from_word(word: &str) -> Option<Size> {
        Size::ALL.into_iter().find(|s| s.word() == word)
    }

    /// The nominal extent (longer bounding-box side / image side).
    pub fn extent(self) -> f32 {
        match self {
            Size::Small => 0.28,
            Size::Medium => 0.44,
            Size::Large => 0.62,
        }
    }

    /// The size class of a measured extent.
    pub fn from_extent(extent: f32) -> Size {
        if extent < Size::THRESHOLDS[0] {
            Size::Small
        } else if extent < Size::THRESHOLDS[1] {
            Size::Medium
        } else {
            Size::Large
        }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

/// Where the object's bounding-box centre sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Position {
    /// (0.5, 0.5)
    Center,
    /// (0.28, 0.28)
    TopLeft,
    /// (0.72, 0.28)
    TopRight,
    /// (0.28, 0.72)
    BottomLeft,
    /// (0.72, 0.72)
    BottomRight,
}

impl Position {
    /// All positions.
    pub const ALL: [Position; 5] = [
        Position::Center,
        Position::TopLeft,
        Position::TopRight,
        Position::BottomLeft,
        Position::BottomRight,
    ];

    /// The caption words (after `in the`).
    pub fn words(self) -> &'static str {
        match self {
            Position::Center => "center",
            Position::TopLeft => "top left",
            Position::TopRight => "top right",
            Position::BottomLeft => "bottom left",
            Position::BottomRight => "bottom right",
        }
    }

    /// The anchor point, as fractions of the image width and height (y down).
    pub fn anchor(self) -> [f32; 2] {
        const LO: f32 = 0.28;
        const HI: f32 = 0.72;
        match self {
            Position::Center => [0.5, 0.5],
            Position::TopLeft => [LO, LO],
            Position::TopRight => [HI, LO],
            Position::BottomLeft => [LO, HI],
            Position::BottomRight => [HI, HI],
        }
    }

    /// The position whose anchor is nearest to `(x, y)` (fractions of the image side).
    pub fn nearest(x: f32, y: f32) -> Position {
        let mut best = (f32::INFINITY, Position::Center);
        for p in Position::ALL {
            let [ax, ay] = p.anchor();
            let d = (x - ax).powi(2) + (y - ay).powi(2);
            if d < best.0 {
                best = (d, p);
            }
        }
        best.1
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.words())
    }
}

/// How the inside of the object is painted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fill {
    /// One colour.
    Solid,
    /// Parallel bands of the object colour and `stripe` (the `striped` concept). `period` is the
    /// band period as a fraction of the object's extent; the bands follow the object's rotation.
    Striped {
        /// The colour of the narrower bands.
        stripe: Colour,
        /// Band period / object extent.
        period: f32,
    },
}

/// How the object is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Style {
    /// A filled shape.
    Filled,
    /// Only the outline, `width` thick (fraction of the object's extent; the `outline` concept).
    Outline {
        /// Line width / object extent.
        width: f32,
    },
}

/// One scene: a single object on a flat background, with the small random jitter that makes
/// renders of the same description differ.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scene {
    /// The object's shape.
    pub shape: Shape,
    /// The object's colour.
    pub colour: Colour,
    /// The background colour (never the object's colour).
    pub background: Colour,
    /// The object's size class.
    pub size: Size,
    /// The object's position class.
    pub position: Position,
    /// How the inside is painted.
    pub fill: Fill,
    /// Filled or outline.
    pub style: Style,
    /// Offset of the centre from the position's anchor (fractions of the image side).
    pub offset: [f32; 2],
    /// Multiplier on the size's nominal extent.
    pub scale: f32,
    /// Rotation in radians (counter-clockwise on screen).
    pub rotation: f32,
}

impl Scene {
    /// A random base-world scene: base shape, solid fill, filled style, jitter included.
    pub fn random_base(rng: &mut impl RngExt) -> Scene {
        let shape = Shape::BASE[rng.random_range(0..Shape::BASE.len())];
        Scene::random_with_shape(rng, shape)
    }

    /// A random scene of a given shape (solid and filled; callers change fill / style).
    pub fn random_with_shape(rng: &mut impl RngExt, shape: Shape) -> Scene {
        let colour = Colour::ALL[rng.random_range(0..Colour::ALL.len())];
        let background = loop {
            let c = Colour::ALL[rng.random_range(0..Colour::ALL.len())];
            if c != colour {
                break c;
            }
        };
        let size = Size::ALL[rng.random_range(0..Size::ALL.len())];
        // A large object fits only in the center.
        let position = if size == Size::Large {
            Position::Center
        } else {
            Position::ALL[rng.random_range(0..Position::ALL.len())]
        };
        let offset = [
            rng.random_range(-0.03f32..0.03),
            rng.random_range(-0.03f32..0.03),
        ];
        let scale = rng.random_range(0.93f32..1.07);
        let rotation = rng.random_range(-0.15f32..0.15);
        Scene {
            shape,
            colour,
            background,
            size,
            position,
            fill: Fill::Solid,
            style: Style::Filled,
            offset,
            scale,
            rotation,
        }
    }

    /// The full description of this scene (every attribute named, the shape as a shape word).
    pub fn full_spec(&self) -> PromptSpec {
        PromptSpec {
            size: Some(self.size),
            colour: Some(self.colour),
            shape: Some(self.shape),
            token: None,
            position: Some(self.position),
            background: Some(self.background),
        }
    }
}

/// Where a concept token stands in a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUse {
    /// In the noun slot, instead of a shape word: `a red zorb`.
    Object,
    /// As a style: `... in wobb style`.
    Style,
}

/// What a prompt asks for; every attribute optional. Written by [`PromptSpec::caption`], read
/// back by [`PromptSpec::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PromptSpec {
    /// `small` / `medium` / `large`.
    pub size: Option<Size>,
    /// The object's colour.
    pub colour: Option<Colour>,
    /// A shape word in the noun slot.
    pub shape: Option<Shape>,
    /// Whether and where the concept token appears.
    pub token: Option<TokenUse>,
    /// `in the <position>`.
    pub position: Option<Position>,
    /// `on a <colour> background`.
    pub background: Option<Colour>,
}

impl PromptSpec {
    /// Writes the caption. The noun is the token when `self.token` is [`TokenUse::Object`],
    /// else the shape word (or `shape` when neither is set); `token` is used only when
    /// `self.token` is set.
    pub fn caption(&self, token: &str) -> String {
        let mut words: Vec<&str> = Vec::new();
        if let Some(s) = self.size {
            words.push(s.word());
        }
        if let Some(c) = self.colour {
            words.push(c.word());
        }
        let noun = match (self.token, self.shape) {
            (Some(TokenUse::Object), _) => token,
            (_, Some(s)) => s.word(),
            _ => "shape",
        };
        words.push(noun);
        let first = words[0];
        let article = if first.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        let mut out = format!("{article} {}", words.join(" "));
        if let Some(p) = self.position {
            out.push_str(" in the ");
            out.push_str(p.words());
        }
        if let Some(b) = self.background {
            let article = if b.word().starts_with(['a', 'e', 'i', 'o', 'u']) {
                "an"
            } else {
                "a"
            };
            out.push_str(&format!(" on {article} {} background", b.word()));
        }
        if self.token == Some(TokenUse::Style) {
            out.push_str(&format!(" in {token} style"));
        }
        out
    }

    /// Reads back what a prompt asks for. Lenient: case, punctuation and unknown words are
    /// ignored. The colour word right before `background` is the background; another colour
    /// word is the object's. `token` (empty: none) counts as [`TokenUse::Style`] when followed
    /// by `style`, else as [`TokenUse::Object`]; an A1111-style `<token>` matches too.
    pub fn parse(prompt: &str, token: &str) -> PromptSpec {
        let lower = prompt.to_lowercase();
        let token = token.trim().to_lowercase();
        let bare_token = token.trim_matches(|c| c == '<' || c == '>').to_string();
        let words: Vec<String> = lower
            .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
            .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric() && c != '<' && c != '>'))
            .filter(|w| !w.is_empty())
            .map(|w| w.to_string())
            .collect();
        let is_token = |w: &str| {
            !bare_token.is_empty() && (w == token || w.trim_matches(['<', '>']) == bare_token)
        };
        let mut spec = PromptSpec::default();
        let mut i = 0;
        while i < words.len() {
            let w = words[i].as_str();
            let next = words.get(i + 1).map(String::as_str);
            if is_token(w) {
                let style = next == Some("style");
                if style {
                    spec.token = Some(TokenUse::Style);
                } else if spec.token.is_none() {
                    spec.token = Some(TokenUse::Object);
                }
            } else if let Some(c) = Colour::from_word(w) {
                if next == Some("background") {
                    spec.background = Some(c);
                } else if spec.colour.is_none() {
                    spec.colour = Some(c);
                }
            } else if let Some(s) = Size::from_word(w) {
                spec.size.get_or_insert(s);
            } else if let Some(s) = Shape::from_word(w) {
                spec.shape.get_or_insert(s);
            } else if (w == "top" || w == "bottom") && matches!(next, Some("left" | "right")) {
                let p = match (w, next) {
                    ("top", Some("left")) => Position::TopLeft,
                    ("top", Some("right")) => Position::TopRight,
                    ("bottom", Some("left")) => Position::BottomLeft,
                    _ => Position::BottomRight,
                };
                spec.position.get_or_insert(p);
                i += 1;
            } else if matches!(w, "center" | "centre" | "middle") {
                spec.position.get_or_insert(Position::Center);
            }
            i += 1;
        }
        spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caption_round_trips_through_parse() {
        let spec = PromptSpec {
            size: Some(Size::Small),
            colour: Some(Colour::Orange),
            shape: Some(Shape::Star),
            token: None,
            position: Some(Position::TopLeft),
            background: Some(Colour::Blue),
        };
        let c = spec.caption("");
        assert_eq!(
            c,
            "a small orange star in the top left on a blue background"
        );
        assert_eq!(PromptSpec::parse(&c, ""), spec);
        let s2 = PromptSpec {
            size: None,
            colour: Some(Colour::Orange),
            shape: None,
            token: Some(TokenUse::Object),
            position: None,
            background: Some(Colour::Orange),
        };
        let c2 = s2.caption("zorb");
        assert_eq!(c2, "an orange zorb on an orange background");
        assert_eq!(PromptSpec::parse(&c2, "zorb"), s2);
        let s3 = PromptSpec {
            shape: Some(Shape::Circle),
            token: Some(TokenUse::Style),
            ..Default::default()
        };
        let c3 = s3.caption("wobb");
        assert_eq!(c3, "a circle in wobb style");
        assert_eq!(PromptSpec::parse(&c3, "wobb"), s3);
    }

    #[test]
    fn parse_is_lenient() {
        let s = PromptSpec::parse(
            "A RED <zorb>, in the Bottom Right, on a white background!",
            "zorb",
        );
        assert_eq!(s.colour, Some(Colour::Red));
        assert_eq!(s.token, Some(TokenUse::Object));
        assert_eq!(s.position, Some(Position::BottomRight));
        assert_eq!(s.background, Some(Colour::White));
        let s = PromptSpec::parse("a zorb", "");
        assert_eq!(s, PromptSpec::default());
    }

    #[test]
    fn nearest_palette_and_position() {
        for c in Colour::ALL {
            assert_eq!(Colour::nearest(c.rgb().map(f32::from)), c);
        }
        for p in Position::ALL {
            let [x, y] = p.anchor();
            assert_eq!(Position::nearest(x + 0.05, y - 0.05), p);
        }
        assert_eq!(Size::from_extent(0.28), Size::Small);
        assert_eq!(Size::from_extent(0.44), Size::Medium);
        assert_eq!(Size::from_extent(0.62), Size::Large);
    }
}
