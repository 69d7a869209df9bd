//! A deterministic detector for world images (no learned model). It reads any RGB image of any
//! size and never panics; on images that hold no object it says so.
//!
//! Steps, for an image of `W` × `H` pixels:
//!
//! 1. **Background**: the per-channel median of the border pixels; its name is the nearest
//!    palette colour.
//! 2. **Object mask**: if under half of the border pixels lie within 40 of that median, the
//!    image has no flat background and no object is reported. Otherwise, pixels whose RGB distance to the background exceeds
//!    `T = clamp(1.5 · p90(border distances), 40, 150)` (the noisier the border, the higher the
//!    bar); the object is the largest 4-connected component of the mask, if it covers at least
//!    `max(4, 0.3 % of the image)` pixels.
//! 3. **Filled mask**: the component closed (3×3 dilate then erode) and its holes filled (every
//!    pixel not reachable from the image border without crossing the component).
//! 4. **Colour**: the nearest palette colour of the per-channel median over the component.
//! 5. **Position / size**: the filled mask's centroid (fractions of W and H) → nearest
//!    position anchor; `extent = max(bbox width / W, bbox height / H)` → size class
//!    (thresholds 0.36 and 0.53).
//! 6. **Shape scores**: the filled mask resampled to a 24×24 grid over its bounding box, and for
//!    each shape (base shapes and the heart) the best soft IoU `Σ min / Σ max` with that shape's
//!    template (rendered the same way at rotations −0.2…0.2 rad) — templates are fitted to the
//!    mask's bounding box, so scale, position and aspect do not matter.
//! 7. **Stripe score**: inside the component eroded once, pixels farther than 60 from the
//!    object colour are "other"; for directions 0°, 10°, …, 170° the pixels are binned by
//!    their coordinate along the direction (1 px bins) and `η² = Σ_b n_b (m_b − m)² /
//!    (N m (1 − m))` measures how much of the other/object variance the bands explain; with
//!    `r` the number of runs of bins whose other-fraction exceeds ½ along the best direction,
//!    `stripe = clamp((η² − 0.2) / 0.4, 0, 1) · clamp((r − 1) / 2, 0, 1)`; 0 when the interior
//!    has under 12 pixels or under 8 % / over 92 % other pixels.
//! 8. **Outline score** (hollowness): `h = |filled \ component| / |filled|`,
//!    `outline = clamp((h − 0.05) / 0.25, 0, 1)`.

use std::sync::OnceLock;

use image::RgbImage;

use super::render::render;
use super::scene::{Colour, Fill, Position, Scene, Shape, Size, Style, rgb_distance};

/// Side of the normalised mask grid.
pub const GRID: usize = 24;

/// What the detector found in an image.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// The background's palette name.
    pub background: Colour,
    /// The measured background colour (median of the border).
    pub background_rgb: [f64; 3],
    /// The object, if there is one.
    pub object: Option<ObjectDetection>,
}

/// The object the detector found.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectDetection {
    /// Its palette name.
    pub colour: Colour,
    /// Its measured colour (median over the object's pixels).
    pub rgb: [f64; 3],
    /// Its position class.
    pub position: Position,
    /// Centroid of the filled mask, as fractions of the image width and height.
    pub centre: [f64; 2],
    /// Its size class.
    pub size: Size,
    /// Longer bounding-box side as a fraction of the image side.
    pub extent: f64,
    /// Filled area as a fraction of the image.
    pub area: f64,
    /// The best-matching shape.
    pub shape: Shape,
    /// Template IoU per shape, in [`Shape::ALL`] order.
    pub shape_scores: [f64; 5],
    /// How striped the inside is, in [0, 1].
    pub stripe: f64,
    /// How hollow the object is (outline only), in [0, 1].
    pub outline: f64,
    /// Fraction of the filled mask that is background inside the object.
    pub hollowness: f64,
    /// Fraction of the interior far from the object colour.
    pub other_fraction: f64,
    /// The filled mask resampled to `GRID` × `GRID` over its bounding box (row-major).
    pub grid: Vec<f64>,
}

impl ObjectDetection {
    /// The template IoU of `shape`.
    pub fn shape_score(&self, shape: Shape) -> f64 {
        Shape::ALL
            .iter()
            .position(|s| *s == shape)
            .map_or(0.0, |i| self.shape_scores[i])
    }
}

/// Soft IoU of two grids: `Σ min / Σ max` (0 when both are empty).
pub fn grid_iou(a: &[f64], b: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        num += x.min(*y);
        den += x.max(*y);
    }
    if den > 0.0 { num / den } else { 0.0 }
}

/// Detects the background and the object of `img`.
pub fn detect(img: &RgbImage) -> Detection {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Detection {
            background: Colour::Black,
            background_rgb: [0.0; 3],
            object: None,
        };
    }
    let px = |x: usize, y: usize| img.get_pixel(x as u32, y as u32).0.map(f32::from);
    // 1. Background from the border.
    let mut border = Vec::with_capacity(2 * (w + h));
    for x in 0..w {
        border.push(px(x, 0));
        border.push(px(x, h - 1));
    }
    for y in 0..h {
        border.push(px(0, y));
        border.push(px(w - 1, y));
    }
    let bg = median_rgb(&border);
    let background = Colour::nearest(bg);
    let background_rgb = bg.map(f64::from);
    let mut bdist: Vec<f32> = border.iter().map(|c| rgb_distance(*c, bg)).collect();
    bdist.sort_by(f32::total_cmp);
    let p90 = bdist[(bdist.len() - 1) * 9 / 10];
    let threshold = (1.5 * p90).clamp(40.0, 150.0);
    // A border that is not mostly one colour is no world background: no object is sought.
    let flat = bdist.iter().filter(|d| **d <= 40.0).count() as f64 / bdist.len() as f64;
    // 2. Object mask and its largest component.
    let mask: Vec<bool> = (0..w * h)
        .map(|i| rgb_distance(px(i % w, i / w), bg) > threshold)
        .collect();
    let component = largest_component(&mask, w, h);
    let count = component.iter().filter(|&&b| b).count();
    let min_area = 4usize.max((w * h) * 3 / 1000);
    if count < min_area || flat < 0.5 {
        return Detection {
            background,
            background_rgb,
            object: None,
        };
    }
    // 3. Filled mask.
    let closed = erode(&dilate(&component, w, h), w, h);
    let closed: Vec<bool> = closed
        .iter()
        .zip(&component)
        .map(|(a, b)| *a || *b)
        .collect();
    let filled = fill_holes(&closed, w, h);
    let filled_count = filled.iter().filter(|&&b| b).count().max(1);
    // 4. Colour.
    let pixels: Vec<[f32; 3]> = (0..w * h)
        .filter(|&i| component[i])
        .map(|i| px(i % w, i / w))
        .collect();
    let rgb = median_rgb(&pixels);
    let colour = Colour::nearest(rgb);
    // 5. Position and size.
    let (mut sx, mut sy) = (0f64, 0f64);
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    for i in (0..w * h).filter(|&i| filled[i]) {
        let (x, y) = (i % w, i / w);
        sx += x as f64 + 0.5;
        sy += y as f64 + 0.5;
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    let centre = [
        sx / filled_count as f64 / w as f64,
        sy / filled_count as f64 / h as f64,
    ];
    let position = Position::nearest(centre[0] as f32, centre[1] as f32);
    let extent = ((x1 - x0 + 1) as f64 / w as f64).max((y1 - y0 + 1) as f64 / h as f64);
    let size = Size::from_extent(extent as f32);
    // 6. Shape scores.
    let grid = normalised_grid(&filled, w, [x0, y0, x1, y1]);
    let mut shape_scores = [0f64; 5];
    for (k, shape) in Shape::ALL.iter().enumerate() {
        shape_scores[k] = templates()
            .iter()
            .filter(|(s, _)| s == shape)
            .map(|(_, t)| grid_iou(&grid, t))
            .fold(0.0, f64::max);
    }
    let best = (0..5)
        .max_by(|&a, &b| shape_scores[a].total_cmp(&shape_scores[b]))
        .unwrap_or(0);
    let shape = Shape::ALL[best];
    // 7. Stripes.
    let interior = erode(&component, w, h);
    let inner: Vec<usize> = (0..w * h).filter(|&i| interior[i]).collect();
    let colours: Vec<[f32; 3]> = inner.iter().map(|&i| px(i % w, i / w)).collect();
    let (major, minor, labels) = two_means(&colours);
    let split = rgb_distance(major, minor) > 60.0;
    let other: Vec<(usize, bool)> = inner
        .iter()
        .zip(&labels)
        .map(|(&i, &l)| (i, split && l))
        .collect();
    let n_other = other.iter().filter(|(_, o)| *o).count();
    let other_fraction = if other.is_empty() {
        0.0
    } else {
        n_other as f64 / other.len() as f64
    };
    let stripe = stripe_score(&other, w, other_fraction);
    // 8. Outline.
    let hollowness = filled
        .iter()
        .zip(&component)
        .filter(|(f, c)| **f && !**c)
        .count() as f64
        / filled_count as f64;
    let outline = ((hollowness - 0.05) / 0.25).clamp(0.0, 1.0);
    Detection {
        background,
        background_rgb,
        object: Some(ObjectDetection {
            colour,
            rgb: rgb.map(f64::from),
            position,
            centre,
            size,
            extent,
            area: filled_count as f64 / (w * h) as f64,
            shape,
            shape_scores,
            stripe,
            outline,
            hollowness,
            other_fraction,
            grid,
        }),
    }
}

/// The stripe score of step 7 from the interior pixels (`(index, is_other)`).
fn stripe_score(other: &[(usize, bool)], w: usize, fraction: f64) -> f64 {
    if other.len() < 12 || !(0.08..=0.92).contains(&fraction) {
        return 0.0;
    }
    let n = other.len() as f64;
    let m = fraction;
    let mut best = (0.0f64, 0usize);
    for step in 0..18 {
        let theta = (step as f64 * 10.0).to_radians();
        let (s, c) = theta.sin_cos();
        let coords: Vec<f64> = other
            .iter()
            .map(|(i, _)| (i % w) as f64 * c + (i / w) as f64 * s)
            .collect();
        let lo = coords.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = coords.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let bins = (hi - lo).floor() as usize + 1;
        let mut count = vec![0f64; bins];
        let mut ones = vec![0f64; bins];
        for ((_, o), t) in other.iter().zip(&coords) {
            let b = ((t - lo).floor() as usize).min(bins - 1);
            count[b] += 1.0;
            if *o {
                ones[b] += 1.0;
            }
        }
        let mut between = 0.0;
        for (c, o) in count.iter().zip(&ones) {
            if *c > 0.0 {
                between += c * (o / c - m).powi(2);
            }
        }
        let eta2 = between / (n * m * (1.0 - m));
        if eta2 > best.0 {
            let mut runs = 0;
            let mut inside = false;
            for (c, o) in count.iter().zip(&ones) {
                if *c == 0.0 {
                    continue;
                }
                let high = o / c > 0.5;
                if high && !inside {
                    runs += 1;
                }
                inside = high;
            }
            best = (eta2, runs);
        }
    }
    let (eta2, runs) = best;
    ((eta2 - 0.2) / 0.4).clamp(0.0, 1.0) * ((runs as f64 - 1.0) / 2.0).clamp(0.0, 1.0)
}

/// Two-means clustering of colours (started from the median and the colour farthest from
/// it, 8 rounds): the larger cluster's centre, the smaller one's, and per colour whether it
/// belongs to the smaller cluster.
fn two_means(colours: &[[f32; 3]]) -> ([f32; 3], [f32; 3], Vec<bool>) {
    let mut a = median_rgb(colours);
    let mut b = colours
        .iter()
        .copied()
        .max_by(|x, y| rgb_distance(*x, a).total_cmp(&rgb_distance(*y, a)))
        .unwrap_or(a);
    let mut labels = vec![false; colours.len()];
    for _ in 0..8 {
        let mut sum = [[0f64; 3]; 2];
        let mut n = [0usize; 2];
        for (c, l) in colours.iter().zip(labels.iter_mut()) {
            *l = rgb_distance(*c, b) < rgb_distance(*c, a);
            let k = usize::from(*l);
            n[k] += 1;
            for ch in 0..3 {
                sum[k][ch] += f64::from(c[ch]);
            }
        }
        if n[0] == 0 || n[1] == 0 {
            break;
        }
        a = [0, 1, 2].map(|ch| (sum[0][ch] / n[0] as f64) as f32);
        b = [0, 1, 2].map(|ch| (sum[1][ch] / n[1] as f64) as f32);
    }
    let n_b = labels.iter().filter(|l| **l).count();
    if n_b * 2 > colours.len() {
        for l in labels.iter_mut() {
            *l = !*l;
        }
        (b, a, labels)
    } else {
        (a, b, labels)
    }
}

/// Per-channel median of a set of colours (black for an empty set).
fn median_rgb(pixels: &[[f32; 3]]) -> [f32; 3] {
    if pixels.is_empty() {
        return [0.0; 3];
    }
    let mut out = [0f32; 3];
    for (k, o) in out.iter_mut().enumerate() {
        let mut v: Vec<f32> = pixels.iter().map(|p| p[k]).collect();
        v.sort_by(f32::total_cmp);
        *o = v[v.len() / 2];
    }
    out
}

/// The largest 4-connected component of `mask` (ties: the first found in raster order).
fn largest_component(mask: &[bool], w: usize, h: usize) -> Vec<bool> {
    let mut label = vec![0u32; w * h];
    let mut best = (0usize, 0u32);
    let mut next = 1u32;
    let mut stack = Vec::new();
    for start in 0..w * h {
        if !mask[start] || label[start] != 0 {
            continue;
        }
        let mut size = 0;
        label[start] = next;
        stack.push(start);
        while let Some(i) = stack.pop() {
            size += 1;
            for j in neighbours4(i, w, h) {
                if mask[j] && label[j] == 0 {
                    label[j] = next;
                    stack.push(j);
                }
            }
        }
        if size > best.0 {
            best = (size, next);
        }
        next += 1;
    }
    label.iter().map(|&l| l != 0 && l == best.1).collect()
}

/// 3×3 dilation.
fn dilate(mask: &[bool], w: usize, h: usize) -> Vec<bool> {
    morph(mask, w, h, true)
}

/// 3×3 erosion (pixels past the border count as outside).
fn erode(mask: &[bool], w: usize, h: usize) -> Vec<bool> {
    morph(mask, w, h, false)
}

fn morph(mask: &[bool], w: usize, h: usize, dilate: bool) -> Vec<bool> {
    let mut out = vec![false; w * h];
    for y in 0..h {
        for x in 0..w {
            let mut any = false;
            let mut all = true;
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    let v = nx >= 0
                        && ny >= 0
                        && (nx as usize) < w
                        && (ny as usize) < h
                        && mask[ny as usize * w + nx as usize];
                    any |= v;
                    all &= v;
                }
            }
            out[y * w + x] = if dilate { any } else { all };
        }
    }
    out
}

/// `mask` with every hole filled: pixels not reachable from the border through non-mask
/// pixels (4-connected) become part of the mask.
fn fill_holes(mask: &[bool], w: usize, h: usize) -> Vec<bool> {
    let mut outside = vec![false; w * h];
    let mut stack = Vec::new();
    for i in 0..w * h {
        let (x, y) = (i % w, i / w);
        if (x == 0 || y == 0 || x + 1 == w || y + 1 == h) && !mask[i] {
            outside[i] = true;
            stack.push(i);
        }
    }
    while let Some(i) = stack.pop() {
        for j in neighbours4(i, w, h) {
            if !mask[j] && !outside[j] {
                outside[j] = true;
                stack.push(j);
            }
        }
    }
    outside.iter().map(|o| !o).collect()
}

/// The mask resampled to `GRID` × `GRID` over the bounding box `[x0, y0, x1, y1]` (inclusive):
/// each cell holds the fraction of 3×3 sample points that fall on mask pixels.
fn normalised_grid(mask: &[bool], w: usize, bbox: [usize; 4]) -> Vec<f64> {
    let [x0, y0, x1, y1] = bbox;
    let bw = (x1 + 1 - x0) as f64;
    let bh = (y1 + 1 - y0) as f64;
    let mut grid = vec![0f64; GRID * GRID];
    for gy in 0..GRID {
        for gx in 0..GRID {
            let mut hits = 0;
            for sy in 0..3 {
                for sx in 0..3 {
                    let fx = (gx as f64 + (sx as f64 + 0.5) / 3.0) / GRID as f64;
                    let fy = (gy as f64 + (sy as f64 + 0.5) / 3.0) / GRID as f64;
                    let x = (x0 as f64 + fx * bw).floor() as usize;
                    let y = (y0 as f64 + fy * bh).floor() as usize;
                    if mask[y.min(y1) * w + x.min(x1)] {
                        hits += 1;
                    }
                }
            }
            grid[gy * GRID + gx] = hits as f64 / 9.0;
        }
    }
    grid
}

/// Rotations at which the shape templates are rendered (radians).
const TEMPLATE_ANGLES: [f32; 5] = [-0.2, -0.1, 0.0, 0.1, 0.2];

/// The shape templates: `(shape, grid)` for every shape and rotation.
fn templates() -> &'static [(Shape, Vec<f64>)] {
    static T: OnceLock<Vec<(Shape, Vec<f64>)>> = OnceLock::new();
    T.get_or_init(|| {
        let mut out = Vec::new();
        for shape in Shape::ALL {
            for angle in TEMPLATE_ANGLES {
                let scene = Scene {
                    shape,
                    colour: Colour::White,
                    background: Colour::Black,
                    size: Size::Large,
                    position: Position::Center,
                    fill: Fill::Solid,
                    style: Style::Filled,
                    offset: [0.0, 0.0],
                    scale: 1.0,
                    rotation: angle,
                };
                let res = 96usize;
                let img = render(&scene, res as u32);
                let mask: Vec<bool> = img.pixels().map(|p| p.0[0] >= 128).collect();
                let (mut x0, mut y0, mut x1, mut y1) = (res, res, 0, 0);
                for i in (0..res * res).filter(|&i| mask[i]) {
                    let (x, y) = (i % res, i / res);
                    x0 = x0.min(x);
                    y0 = y0.min(y);
                    x1 = x1.max(x);
                    y1 = y1.max(y);
                }
                out.push((shape, normalised_grid(&mask, res, [x0, y0, x1, y1])));
            }
        }
        out
    })
}

/// The 4-connected neighbours of pixel `i` of a `w`×`h` image (row-major).
fn neighbours4(i: usize, w: usize, h: usize) -> impl Iterator<Item = usize> {
    let (x, y) = (i % w, i / w);
    [
        (x > 0).then(|| i - 1),
        (x + 1 < w).then(|| i + 1),
        (y > 0).then(|| i - w),
        (y + 1 < h).then(|| i + w),
    ]
    .into_iter()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;
    use rand::{RngExt, SeedableRng};

    #[test]
    fn no_panic_and_no_object_on_degenerate_images() {
        for (w, h) in [(0, 0), (1, 1), (1, 7), (3, 2), (64, 64), (50, 17)] {
            let flat = RgbImage::from_pixel(w, h, Rgb([10, 200, 30]));
            let d = detect(&flat);
            assert!(d.object.is_none(), "{w}x{h} flat");
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
            let noise = RgbImage::from_fn(w, h, |_, _| Rgb(rng.random::<[u8; 3]>()));
            let _ = detect(&noise);
        }
        let d = detect(&RgbImage::from_pixel(8, 8, Rgb([10, 200, 30])));
        assert_eq!(d.background, Colour::Green);
    }

    #[test]
    fn templates_score_their_own_shape_best() {
        for shape in Shape::ALL {
            let scene = Scene {
                shape,
                colour: Colour::Yellow,
                background: Colour::Purple,
                size: Size::Medium,
                position: Position::TopRight,
                fill: Fill::Solid,
                style: Style::Filled,
                offset: [0.01, -0.02],
                scale: 1.0,
                rotation: 0.05,
            };
            let d = detect(&render(&scene, 64));
            let o = d.object.expect("object");
            assert_eq!(o.shape, shape, "{shape}: {:?}", o.shape_scores);
            assert_eq!(o.colour, Colour::Yellow);
            assert_eq!(o.position, Position::TopRight);
            assert_eq!(o.size, Size::Medium);
            assert_eq!(d.background, Colour::Purple);
        }
    }
}
