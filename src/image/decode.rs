//! Decoding JPEG, PNG and WebP with their EXIF orientation applied.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};
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
    /// Larger than any image decoded here (a decompression bomb, or a corrupt header).
    #[error(
        "{path}: image header claims {width}x{height}, beyond the {MAX_SIDE} px per side or \
         1 GiB decoded that sdpipe accepts"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Width in the header.
        width: u32,
        /// Height in the header.
        height: u32,
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

/// The largest side accepted, in pixels. Photos from 100-megapixel cameras are ~11600 px wide;
/// a header claiming more is a decompression bomb or corruption, and decoding it would abort
/// the process when the allocation fails.
pub const MAX_SIDE: u32 = 20_000;

/// The most bytes one decoded image may take (16-bit RGBA of a 180-megapixel image). Decoding
/// runs on every core at once, so this bounds memory, not only one image.
pub const MAX_DECODED_BYTES: u64 = 1 << 30;

/// Decodes `bytes` (read from `path`) to RGB8 with the EXIF orientation applied.
///
/// Refuses, naming the file, what a lenient decoder would turn into a wrong picture or an
/// aborted process: a header larger than 20 000 pixels a side or 1 GiB decoded, and a JPEG
/// whose scan is truncated or corrupt (decoded in strict mode; lenient decoders fill the rest
/// with grey).
pub fn decode_image(path: &Path, bytes: &[u8]) -> Result<RgbImage, ImageError> {
    let corrupt = |reason: String| ImageError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| corrupt(e.to_string()))?;
    if reader.format() == Some(ImageFormat::Jpeg) {
        return decode_jpeg_strict(path, bytes);
    }
    let mut decoder = reader.into_decoder().map_err(|e| corrupt(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    check_size(path, width, height, decoder.total_bytes())?;
    // The same bounds for what the decoder allocates beyond the pixels (metadata, frames).
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    decoder
        .set_limits(limits)
        .map_err(|e| corrupt(e.to_string()))?;
    let orientation = decoder.orientation().map_err(|e| corrupt(e.to_string()))?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| corrupt(e.to_string()))?;
    image.apply_orientation(orientation);
    Ok(image.to_rgb8())
}

/// Refuses an image whose header claims more than the limits, before anything is allocated.
fn check_size(path: &Path, width: u32, height: u32, decoded_bytes: u64) -> Result<(), ImageError> {
    if width > MAX_SIDE || height > MAX_SIDE || decoded_bytes > MAX_DECODED_BYTES {
        return Err(ImageError::TooLarge {
            path: path.to_path_buf(),
            width,
            height,
        });
    }
    Ok(())
}

/// A JPEG through zune-jpeg in strict mode: a premature end of data or a corrupt entropy-coded
/// segment is an error (the `image` crate decodes both silently to grey).
fn decode_jpeg_strict(path: &Path, bytes: &[u8]) -> Result<RgbImage, ImageError> {
    use zune_core::bytestream::ZCursor;
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::DecoderOptions;

    let corrupt = |reason: String| ImageError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let options = DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(MAX_SIDE as usize)
        .set_max_height(MAX_SIDE as usize)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    if let Err(e) = decoder.decode_headers() {
        // The header is all that was read: a size over the limits is reported as such.
        if let Some((w, h)) = decoder.dimensions() {
            let (w, h) = (w as u32, h as u32);
            check_size(path, w, h, u64::from(w) * u64::from(h) * 3)?;
        }
        return Err(corrupt(e.to_string()));
    }
    let (width, height) = decoder
        .dimensions()
        .ok_or_else(|| corrupt("no frame header".into()))?;
    let (width, height) = (width as u32, height as u32);
    check_size(
        path,
        width,
        height,
        u64::from(width) * u64::from(height) * 3,
    )?;
    let pixels = decoder.decode().map_err(|e| corrupt(e.to_string()))?;
    if decoder.output_colorspace() != Some(ColorSpace::RGB) {
        return Err(corrupt(format!(
            "decoded to {:?}, not RGB",
            decoder.output_colorspace()
        )));
    }
    let orientation = decoder
        .exif()
        .and_then(|exif| Orientation::from_exif_chunk(exif))
        .unwrap_or(Orientation::NoTransforms);
    let rgb = RgbImage::from_raw(width, height, pixels)
        .ok_or_else(|| corrupt("fewer pixels than the header's size".into()))?;
    let mut image = DynamicImage::ImageRgb8(rgb);
    image.apply_orientation(orientation);
    Ok(image.to_rgb8())
}
