//! Text for image labels: the bundled DejaVu Sans font, measuring, wrapping/shortening and
//! anti-aliased drawing onto RGB images.

use ab_glyph::{Font, FontRef, PxScale, ScaleFont, point};
use image::RgbImage;

use super::RenderError;

/// DejaVu Sans 2.37 (Bitstream Vera license; see `assets/fonts/LICENSE-DejaVu.txt`).
pub(crate) static DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Marker appended to text shortened to fit.
pub const ELLIPSIS: &str = "…";

/// A font for labels, at any pixel size.
#[derive(Debug, Clone)]
pub struct LabelFont {
    font: FontRef<'static>,
}

impl LabelFont {
    /// The font bundled with sdpipe (DejaVu Sans).
    pub fn bundled() -> Result<Self, RenderError> {
        let font = FontRef::try_from_slice(DEJAVU_SANS)
            .map_err(|e| RenderError::Font(format!("bundled DejaVuSans.ttf: {e}")))?;
        Ok(Self { font })
    }

    /// Distance between baselines of consecutive lines at `px` pixels.
    pub fn line_height(&self, px: f32) -> f32 {
        let f = self.font.as_scaled(PxScale::from(px));
        f.ascent() - f.descent() + f.line_gap()
    }

    /// Advance width of `text` (one line) at `px` pixels, kerning included.
    pub fn text_width(&self, text: &str, px: f32) -> f32 {
        let f = self.font.as_scaled(PxScale::from(px));
        let mut width = 0.0;
        let mut prev = None;
        for c in text.chars() {
            let id = f.glyph_id(c);
            if let Some(p) = prev {
                width += f.kern(p, id);
            }
            width += f.h_advance(id);
            prev = Some(id);
        }
        width
    }

    /// Shortens `text` with a trailing "…" so it fits in `max_width` pixels.
    pub fn ellipsize(&self, text: &str, px: f32, max_width: f32) -> String {
        if self.text_width(text, px) <= max_width {
            return text.to_string();
        }
        let mut chars: Vec<char> = text.chars().collect();
        while !chars.is_empty() {
            chars.pop();
            let candidate: String =
                chars.iter().collect::<String>().trim_end().to_string() + ELLIPSIS;
            if self.text_width(&candidate, px) <= max_width {
                return candidate;
            }
        }
        String::new()
    }

    /// Word-wraps `text` into lines of at most `max_width` pixels; words wider than a line are
    /// broken between characters. With more than `max_lines` lines, the last kept line is
    /// shortened with "…".
    pub fn wrap(&self, text: &str, px: f32, max_width: f32, max_lines: usize) -> Vec<String> {
        let max_lines = max_lines.max(1);
        let mut lines: Vec<String> = Vec::new();
        let mut current = String::new();
        for word in text.split_whitespace() {
            let candidate = if current.is_empty() {
                word.to_string()
            } else {
                format!("{current} {word}")
            };
            if self.text_width(&candidate, px) <= max_width {
                current = candidate;
                continue;
            }
            if !current.is_empty() {
                lines.push(std::mem::take(&mut current));
            }
            // The word alone: break it between characters if it is still too wide.
            for c in word.chars() {
                let mut next = current.clone();
                next.push(c);
                if !current.is_empty() && self.text_width(&next, px) > max_width {
                    lines.push(std::mem::take(&mut current));
                    current.push(c);
                } else {
                    current = next;
                }
            }
        }
        if !current.is_empty() {
            lines.push(current);
        }
        if lines.len() > max_lines {
            lines.truncate(max_lines);
            if let Some(last) = lines.last_mut() {
                *last = self.ellipsize(&format!("{last}{ELLIPSIS}"), px, max_width);
            }
        }
        lines
    }

    /// Draws one line of `text` with its top-left corner at (`x`, `y`), alpha-blending
    /// `color` over the image; parts outside the image are clipped.
    pub fn draw(&self, img: &mut RgbImage, text: &str, px: f32, x: f32, y: f32, color: [u8; 3]) {
        let f = self.font.as_scaled(PxScale::from(px));
        let baseline = y + f.ascent();
        let (w, h) = (img.width() as i32, img.height() as i32);
        let mut caret = x;
        let mut prev = None;
        for c in text.chars() {
            let id = f.glyph_id(c);
            if let Some(p) = prev {
                caret += f.kern(p, id);
            }
            let glyph = id.with_scale_and_position(PxScale::from(px), point(caret, baseline));
            caret += f.h_advance(id);
            prev = Some(id);
            let Some(outline) = self.font.outline_glyph(glyph) else {
                continue;
            };
            let bounds = outline.px_bounds();
            outline.draw(|gx, gy, coverage| {
                let px_x = bounds.min.x as i32 + gx as i32;
                let px_y = bounds.min.y as i32 + gy as i32;
                if px_x < 0 || px_y < 0 || px_x >= w || px_y >= h {
                    return;
                }
                let a = coverage.clamp(0.0, 1.0);
                let p = img.get_pixel_mut(px_x as u32, px_y as u32);
                for (dst, &src) in p.0.iter_mut().zip(&color) {
                    let blended = *dst as f32 * (1.0 - a) + src as f32 * a;
                    *dst = blended.round().clamp(0.0, 255.0) as u8;
                }
            });
        }
    }
}
