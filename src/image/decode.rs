//! Decoding JPEG, PNG and WebP with their EXIF orientation applied.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use thiserror::Error;

/// An image that cannot be used, naming the file.
#[derive(Debug, Error)]
pub enum ImageError {
    /// Not decodable (truncated, corrupt, or not an image).
    #[error("{path}: corrupt or unreadable image: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The decoder's message.
        reason: String,
    },
    /// Smaller than the stage accepts.
    #[error(
        "{path}: image is {width}x{height}, smaller than the minimum {min} px on its short side"
    )]
    TooSmall {
        /// The file.
        path: PathBuf,
        /// Width after orientation.
        width: u32,
        /// Height after orientation.
        height: u32,
        /// The minimum short side.
        min: u32,
    },
}

/// Decodes `bytes` (read from `path`) to RGB8 with the EXIF orientation applied.
pub fn decode_image(path: &Path, bytes: &[u8]) -> Result<RgbImage, ImageError> {
    let corrupt = |reason: String| ImageError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| corrupt(e.to_string()))?;
    let mut decoder = reader.into_decoder().map_err(|e| corrupt(e.to_string()))?;
    let orientation = decoder.orientation().map_err(|e| corrupt(e.to_string()))?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| corrupt(e.to_string()))?;
    image.apply_orientation(orientation);
    Ok(image.to_rgb8())
}
