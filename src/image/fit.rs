//! Resize-to-cover then crop, and conversion to CHW float tensors in [-1, 1].

use image::RgbImage;
use image::imageops::{self, FilterType};
use serde::{Deserialize, Serialize};

/// Where the crop was taken, in the coordinates of the resized image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CropBox {
    /// Size of the image after resizing, before cropping.
    pub resized: [u32; 2],
    /// Left edge of the crop.
    pub x: u32,
    /// Top edge of the crop.
    pub y: u32,
    /// Crop width (the target width).
    pub width: u32,
    /// Crop height (the target height).
    pub height: u32,
}

/// Scales `img` (Lanczos3) to cover `width`×`height`, then crops that size at the offset
/// chosen by `pick(max_x, max_y)` (center, or random).
pub fn fit_and_crop(
    img: &RgbImage,
    width: u32,
    height: u32,
    pick: impl FnOnce(u32, u32) -> (u32, u32),
) -> (RgbImage, CropBox) {
    let (w, h) = img.dimensions();
    let scale = (f64::from(width) / f64::from(w)).max(f64::from(height) / f64::from(h));
    let rw = ((f64::from(w) * scale).round() as u32).max(width);
    let rh = ((f64::from(h) * scale).round() as u32).max(height);
    let resized = if (rw, rh) == (w, h) {
        img.clone()
    } else {
        imageops::resize(img, rw, rh, FilterType::Lanczos3)
    };
    let (x, y) = pick(rw - width, rh - height);
    let x = x.min(rw - width);
    let y = y.min(rh - height);
    let cropped = imageops::crop_imm(&resized, x, y, width, height).to_image();
    (
        cropped,
        CropBox {
            resized: [rw, rh],
            x,
            y,
            width,
            height,
        },
    )
}

/// RGB8 → f32 `[3, h, w]` in [-1, 1] (the VAE's input range), channel-major.
pub fn to_chw_tensor(img: &RgbImage) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = f32::from(p[c]) / 127.5 - 1.0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_then_crops_to_the_target() {
        let img = RgbImage::from_pixel(200, 100, image::Rgb([255, 0, 0]));
        let (out, bx) = fit_and_crop(&img, 64, 64, |mx, my| (mx / 2, my / 2));
        assert_eq!(out.dimensions(), (64, 64));
        assert_eq!(bx.resized, [128, 64]);
        assert_eq!((bx.x, bx.y), (32, 0));
        let t = to_chw_tensor(&out);
        assert_eq!(t.len(), 3 * 64 * 64);
        assert!((t[0] - 1.0).abs() < 1e-6 && (t[64 * 64] + 1.0).abs() < 1e-6);
    }
}
