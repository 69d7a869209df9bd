//! Rendering results for people: labelled sample grids ([`grid`]) drawn with the bundled DejaVu
//! Sans font ([`font`]), and PNG files carrying A1111-style generation settings ([`png_meta`]).

pub mod font;
pub mod grid;
pub mod png_meta;

use std::path::PathBuf;

use image::RgbImage;

pub use font::LabelFont;
pub use grid::{GridLayout, GridStyle, SampleGrid};
pub use png_meta::{
    GenerationParameters, read_parameters, read_png_text, write_png_atomic,
    write_png_with_parameters,
};

/// Errors of rendering and writing images.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// A file could not be written or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// PNG encoding or decoding failed.
    #[error("PNG: {0}")]
    Png(String),
    /// The bundled font could not be loaded.
    #[error("font: {0}")]
    Font(String),
    /// The grid's contents are inconsistent.
    #[error("sample grid: {0}")]
    Grid(String),
    /// A `parameters` text could not be parsed.
    #[error("A1111 parameters: {0}")]
    Parameters(String),
}

/// Converts a channel-first float image `[3, height, width]` with values in [0, 1] (what the
/// VAE decode + `(x / 2 + 0.5).clamp(0, 1)` gives) to 8-bit RGB, rounding like diffusers'
/// `numpy_to_pil` (`(x * 255).round()`).
pub fn rgb_image_from_chw(data: &[f32], height: u32, width: u32) -> Result<RgbImage, RenderError> {
    let plane = height as usize * width as usize;
    if data.len() != 3 * plane {
        return Err(RenderError::Grid(format!(
            "expected 3 x {height} x {width} = {} values for an RGB image, got {}",
            3 * plane,
            data.len()
        )));
    }
    let mut img = RgbImage::new(width, height);
    for (i, p) in img.pixels_mut().enumerate() {
        for c in 0..3 {
            let v = data[c * plane + i];
            let v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
            p.0[c] = (v * 255.0).round() as u8;
        }
    }
    Ok(img)
}
