//! Rendering a [`Scene`]: the object is rasterised on a supersampled grid (4×4 samples per
//! pixel) and averaged down, which anti-aliases its edges. Every shape is defined in its own
//! "natural" frame (y down); the renderer scales the natural bounding box so that its longer
//! side is the size's extent, centres it on the position's anchor and rotates it.

use image::{Rgb, RgbImage};

use super::scene::{Fill, Scene, Shape, Style};

/// Samples per pixel along each axis.
const SUPERSAMPLE: u32 = 4;
/// Inner radius of the star (outer radius 1).
const STAR_INNER: f32 = 0.45;
/// Stripe colour's share of each stripe period.
const STRIPE_DUTY: f32 = 0.4;

/// Whether the point `(u, v)` of a shape's natural frame (y down) is inside it.
pub(crate) fn shape_contains(shape: Shape, u: f32, v: f32) -> bool {
    match shape {
        Shape::Circle => u * u + v * v <= 1.0,
        Shape::Square => u.abs() <= 1.0 && v.abs() <= 1.0,
        Shape::Triangle => {
            // Vertices (0, -1), (±√3/2, 1/2): below the two upper edges and above the base.
            // Edge from (0, -1) to (√3/2, 1/2): v = -1 + √3·|u|.
            v <= 0.5 && v >= -1.0 + 3f32.sqrt() * u.abs()
        }
        Shape::Star => in_polygon(&star_polygon(), u, v),
        Shape::Heart => {
            // (x² + y² − 1)³ − x²·y³ ≤ 0 with y up; scaled so the heart is about 2 units tall.
            let x = u;
            let y = -v;
            let a = x * x + y * y - 1.0;
            a * a * a - x * x * y * y * y <= 0.0
        }
    }
}

/// The natural bounding box `[xmin, ymin, xmax, ymax]` of a shape.
pub(crate) fn natural_bbox(shape: Shape) -> [f32; 4] {
    match shape {
        Shape::Circle | Shape::Square => [-1.0, -1.0, 1.0, 1.0],
        Shape::Triangle => {
            let h = 3f32.sqrt() / 2.0;
            [-h, -1.0, h, 0.5]
        }
        Shape::Star => {
            let p = star_polygon();
            let mut b = [
                f32::INFINITY,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NEG_INFINITY,
            ];
            for (x, y) in p {
                b = [b[0].min(x), b[1].min(y), b[2].max(x), b[3].max(y)];
            }
            b
        }
        // Measured on a fine grid (see the test below).
        Shape::Heart => [-1.1394, -1.2361, 1.1394, 1.0],
    }
}

/// The bounding box `[xmin, ymin, xmax, ymax]` of a shape rotated by `rotation` around its
/// natural bounding box's centre (natural units, relative to that centre).
fn rotated_bbox(shape: Shape, rotation: f32) -> [f32; 4] {
    let [bx0, by0, bx1, by1] = natural_bbox(shape);
    let (ncx, ncy) = ((bx0 + bx1) / 2.0, (by0 + by1) / 2.0);
    let (sin, cos) = rotation.sin_cos();
    let mut b = [
        f32::INFINITY,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
    ];
    let mut add = |u: f32, v: f32| {
        let (x, y) = (u - ncx, v - ncy);
        let (qx, qy) = (x * cos - y * sin, x * sin + y * cos);
        b = [b[0].min(qx), b[1].min(qy), b[2].max(qx), b[3].max(qy)];
    };
    match shape {
        Shape::Circle => return [-1.0, -1.0, 1.0, 1.0],
        Shape::Square => [(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]
            .into_iter()
            .for_each(|(u, v)| add(u, v)),
        Shape::Triangle => {
            let h = 3f32.sqrt() / 2.0;
            [(0.0, -1.0), (h, 0.5), (-h, 0.5)]
                .into_iter()
                .for_each(|(u, v)| add(u, v));
        }
        Shape::Star => star_polygon().into_iter().for_each(|(u, v)| add(u, v)),
        Shape::Heart => {
            let n = 160;
            for j in 0..=n {
                for i in 0..=n {
                    let u = bx0 + (bx1 - bx0) * i as f32 / n as f32;
                    let v = by0 + (by1 - by0) * j as f32 / n as f32;
                    if shape_contains(shape, u, v) {
                        add(u, v);
                    }
                }
            }
        }
    }
    b
}

/// The star's ten vertices, outer point up.
fn star_polygon() -> [(f32, f32); 10] {
    let mut p = [(0.0, 0.0); 10];
    for (k, v) in p.iter_mut().enumerate() {
        let angle = -std::f32::consts::FRAC_PI_2 + k as f32 * std::f32::consts::PI / 5.0;
        let r = if k % 2 == 0 { 1.0 } else { STAR_INNER };
        *v = (r * angle.cos(), r * angle.sin());
    }
    p
}

/// Even-odd point-in-polygon test.
fn in_polygon(poly: &[(f32, f32)], x: f32, y: f32) -> bool {
    let mut inside = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let (xi, yi) = poly[i];
        let (xj, yj) = poly[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// Renders `scene` at `resolution` × `resolution` pixels (a resolution of 0 is taken as 1).
pub fn render(scene: &Scene, resolution: u32) -> RgbImage {
    let res = resolution.max(1);
    let ss = SUPERSAMPLE;
    let side = (res * ss) as usize;
    let labels = rasterise(scene, side);
    let bg = scene.background.rgb().map(f32::from);
    let fg = scene.colour.rgb().map(f32::from);
    let stripe = match scene.fill {
        Fill::Striped { stripe, .. } => stripe.rgb().map(f32::from),
        Fill::Solid => fg,
    };
    let mut img = RgbImage::new(res, res);
    let n = (ss * ss) as f32;
    for py in 0..res {
        for px in 0..res {
            let mut acc = [0f32; 3];
            for sy in 0..ss {
                for sx in 0..ss {
                    let i = (py * ss + sy) as usize * side + (px * ss + sx) as usize;
                    let c = match labels[i] {
                        0 => bg,
                        1 => fg,
                        _ => stripe,
                    };
                    for k in 0..3 {
                        acc[k] += c[k];
                    }
                }
            }
            img.put_pixel(
                px,
                py,
                Rgb(acc.map(|a| (a / n).round().clamp(0.0, 255.0) as u8)),
            );
        }
    }
    img
}

/// Labels every sample of a `side` × `side` supersampled grid: 0 = background, 1 = object
/// colour, 2 = stripe colour.
fn rasterise(scene: &Scene, side: usize) -> Vec<u8> {
    let [bx0, by0, bx1, by1] = natural_bbox(scene.shape);
    let ncx = (bx0 + bx1) / 2.0;
    let ncy = (by0 + by1) / 2.0;
    // The rotated shape's bounding box (natural units, around the natural centre): its longer
    // side gets the size's extent and its centre sits on the anchor.
    let [qx0, qy0, qx1, qy1] = rotated_bbox(scene.shape, scene.rotation);
    let rotated_extent = (qx1 - qx0).max(qy1 - qy0);
    let extent_px = scene.size.extent() * scene.scale * side as f32;
    // natural units per sample
    let k = rotated_extent / extent_px.max(1e-3);
    let [ax, ay] = scene.position.anchor();
    let cx = (ax + scene.offset[0]) * side as f32;
    let cy = (ay + scene.offset[1]) * side as f32;
    let qcx = (qx0 + qx1) / 2.0;
    let qcy = (qy0 + qy1) / 2.0;
    let (sin, cos) = (-scene.rotation).sin_cos();
    let mut labels = vec![0u8; side * side];
    // Coordinate of each sample across the stripes (fractions of the extent).
    let mut local_u = vec![0f32; side * side];
    for y in 0..side {
        for x in 0..side {
            // Offset from the rotated bbox's centre, in natural units.
            let qx = (x as f32 + 0.5 - cx) * k + qcx;
            let qy = (y as f32 + 0.5 - cy) * k + qcy;
            // Rotate back into the object's frame.
            let rx = qx * cos - qy * sin;
            let ry = qx * sin + qy * cos;
            let u = rx + ncx;
            let v = ry + ncy;
            let i = y * side + x;
            if shape_contains(scene.shape, u, v) {
                labels[i] = 1;
            }
            local_u[i] = rx / rotated_extent;
        }
    }
    if let Style::Outline { width } = scene.style {
        let dist = chamfer_inside_distance(&labels, side);
        // Chamfer 3-4 distances are three times the sample distance.
        let limit = 3.0 * width * extent_px;
        for (l, d) in labels.iter_mut().zip(&dist) {
            if *l == 1 && *d as f32 > limit {
                *l = 0;
            }
        }
    }
    if let Fill::Striped { period, .. } = scene.fill {
        let period = period.max(1e-3);
        for (l, u) in labels.iter_mut().zip(&local_u) {
            if *l == 1 {
                // Bands centred on the object: the phase puts a stripe band's middle at u = 0.
                let phase = (u / period + STRIPE_DUTY / 2.0).rem_euclid(1.0);
                if phase < STRIPE_DUTY {
                    *l = 2;
                }
            }
        }
    }
    labels
}

/// For each sample inside the mask, the chamfer (3-4) distance to the nearest outside sample
/// (samples past the border count as outside).
pub(crate) fn chamfer_inside_distance(labels: &[u8], side: usize) -> Vec<u32> {
    const BIG: u32 = u32::MAX / 4;
    let mut d: Vec<u32> = labels
        .iter()
        .map(|&l| if l == 0 { 0 } else { BIG })
        .collect();
    let get = |d: &Vec<u32>, x: isize, y: isize| -> u32 {
        if x < 0 || y < 0 || x >= side as isize || y >= side as isize {
            0
        } else {
            d[y as usize * side + x as usize]
        }
    };
    for y in 0..side as isize {
        for x in 0..side as isize {
            let i = y as usize * side + x as usize;
            if d[i] == 0 {
                continue;
            }
            let m = (get(&d, x - 1, y) + 3)
                .min(get(&d, x, y - 1) + 3)
                .min(get(&d, x - 1, y - 1) + 4)
                .min(get(&d, x + 1, y - 1) + 4);
            d[i] = d[i].min(m);
        }
    }
    for y in (0..side as isize).rev() {
        for x in (0..side as isize).rev() {
            let i = y as usize * side + x as usize;
            if d[i] == 0 {
                continue;
            }
            let m = (get(&d, x + 1, y) + 3)
                .min(get(&d, x, y + 1) + 3)
                .min(get(&d, x + 1, y + 1) + 4)
                .min(get(&d, x - 1, y + 1) + 4);
            d[i] = d[i].min(m);
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::scene::{Colour, Position, Size};

    fn scene(shape: Shape) -> Scene {
        Scene {
            shape,
            colour: Colour::Red,
            background: Colour::Blue,
            size: Size::Large,
            position: Position::Center,
            fill: Fill::Solid,
            style: Style::Filled,
            offset: [0.0, 0.0],
            scale: 1.0,
            rotation: 0.0,
        }
    }

    #[test]
    fn natural_bboxes_are_tight() {
        for shape in Shape::ALL {
            let [x0, y0, x1, y1] = natural_bbox(shape);
            let n = 600;
            let mut b = [
                f32::INFINITY,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NEG_INFINITY,
            ];
            for j in 0..=n {
                for i in 0..=n {
                    let u = -1.5 + 3.0 * i as f32 / n as f32;
                    let v = -1.5 + 3.0 * j as f32 / n as f32;
                    if shape_contains(shape, u, v) {
                        b = [b[0].min(u), b[1].min(v), b[2].max(u), b[3].max(v)];
                    }
                }
            }
            let tol = 0.011;
            assert!(
                (b[0] - x0).abs() < tol
                    && (b[1] - y0).abs() < tol
                    && (b[2] - x1).abs() < tol
                    && (b[3] - y1).abs() < tol,
                "{shape}: measured {b:?}, declared {:?}",
                [x0, y0, x1, y1]
            );
        }
    }

    #[test]
    fn extent_and_centre_match_the_scene() {
        for shape in Shape::ALL {
            let img = render(&scene(shape), 64);
            let bg = Colour::Blue.rgb();
            let (mut x0, mut y0, mut x1, mut y1) = (64, 64, 0, 0);
            for (x, y, p) in img.enumerate_pixels() {
                if p.0 != bg {
                    x0 = x0.min(x);
                    y0 = y0.min(y);
                    x1 = x1.max(x);
                    y1 = y1.max(y);
                }
            }
            let extent = ((x1 - x0).max(y1 - y0) + 1) as f32 / 64.0;
            assert!((extent - 0.62).abs() < 0.04, "{shape}: extent {extent}");
            let cx = (x0 + x1 + 1) as f32 / 2.0 / 64.0;
            let cy = (y0 + y1 + 1) as f32 / 2.0 / 64.0;
            assert!(
                (cx - 0.5).abs() < 0.03 && (cy - 0.5).abs() < 0.03,
                "{shape}: {cx},{cy}"
            );
            // The centre pixel is the object's colour and a corner the background's.
            assert_eq!(img.get_pixel(0, 0).0, bg);
        }
    }

    #[test]
    fn outline_is_hollow_and_stripes_alternate() {
        let mut s = scene(Shape::Square);
        s.style = Style::Outline { width: 0.08 };
        let img = render(&s, 64);
        assert_eq!(img.get_pixel(32, 32).0, Colour::Blue.rgb());
        assert_eq!(img.get_pixel(32, 13).0, Colour::Red.rgb());
        let mut s = scene(Shape::Circle);
        s.fill = Fill::Striped {
            stripe: Colour::White,
            period: 0.25,
        };
        let img = render(&s, 64);
        let row: Vec<bool> = (14..50)
            .map(|x| img.get_pixel(x, 32).0 == Colour::White.rgb())
            .collect();
        let changes = row.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(
            changes >= 5,
            "{changes} colour changes along the middle row"
        );
    }
}
