//! Image handling: decoding with EXIF orientation, resizing and cropping, aspect-ratio buckets,
//! and conversion to the float tensors the models read.

mod bucket;
mod decode;
mod fit;

pub use bucket::{Bucket, BucketSet};
pub use decode::{ImageError, decode_image};
pub use fit::{CropBox, fit_and_crop, to_chw_tensor};

use std::path::Path;

/// File extensions treated as images (lowercase).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp"];

/// Whether `path` has an image extension.
pub fn is_image_file(path: &Path) -> bool {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}
