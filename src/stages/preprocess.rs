//! `preprocess`: decodes each captioned image (EXIF orientation applied), rejects corrupt or
//! too-small ones naming each file, resizes and crops to `resolution` (center or seeded random)
//! or to an aspect-ratio bucket, optionally adds a horizontally flipped copy, and writes one
//! normalised float tensor per item. Items are cached one by one, so adding an image processes
//! only that image.

use crate::stages::artifact::Artifact;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context as _, bail};
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::ParamError;
use super::caption::CaptionManifest;
use super::context::{StageContext, StageResult};
use crate::cache::store::ITEMS;
use crate::cache::{BlobRef, KEY_SCHEMA, Record, hash_bytes};
use crate::image::{
    Bucket, BucketSet, CropBox, ImageError, decode_image, fit_and_crop, to_chw_tensor,
};
use crate::settings::PipelineSettings;

/// Implementation version (part of the key).
pub const VERSION: u32 = 2;

/// `[stage.NAME] kind = "preprocess"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessParams {
    /// Side of the square training resolution (multiple of 8); with buckets, the bucket area is
    /// `resolution`².
    #[serde(default = "default_resolution")]
    pub resolution: u32,
    /// `"crop"` (every item `resolution`×`resolution`) or `"bucket"` (aspect-ratio buckets).
    #[serde(default)]
    pub mode: ResizeMode,
    /// Where crops are taken: `"center"`, or `"random"` (seeded by the pipeline seed and the
    /// image, recorded in the manifest).
    #[serde(default)]
    pub crop: CropMode,
    /// Bucket grid (used when `mode = "bucket"`).
    #[serde(default)]
    pub bucket: BucketParams,
    /// Also emit a horizontally flipped copy of every item.
    #[serde(default)]
    pub flip: bool,
    /// `"fail"`: a corrupt or too-small image fails the stage; `"skip"`: it is left out and
    /// reported.
    #[serde(default)]
    pub on_bad_image: OnBadImage,
    /// Minimum short side in pixels; smaller images are bad. Default: half the resolution
    /// (crop mode) or `bucket.min` (bucket mode).
    #[serde(default)]
    pub min_size: Option<u32>,
}

fn default_resolution() -> u32 {
    512
}

/// How items are sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeMode {
    /// Square `resolution` crops.
    #[default]
    Crop,
    /// Aspect-ratio buckets.
    Bucket,
}

/// Where the crop is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CropMode {
    /// Centered.
    #[default]
    Center,
    /// Random, seeded per image.
    Random,
}

/// What a bad image does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadImage {
    /// Fail the stage, listing every bad image.
    #[default]
    Fail,
    /// Leave it out and report it.
    Skip,
}

/// `[stage.NAME.bucket]`, as kohya's `min_bucket_reso`, `max_bucket_reso`, `bucket_reso_steps`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketParams {
    /// Smallest bucket side.
    #[serde(default = "default_bucket_min")]
    pub min: u32,
    /// Largest bucket side.
    #[serde(default = "default_bucket_max")]
    pub max: u32,
    /// Bucket sides are multiples of this.
    #[serde(default = "default_bucket_step")]
    pub step: u32,
}

impl Default for BucketParams {
    fn default() -> Self {
        BucketParams {
            min: default_bucket_min(),
            max: default_bucket_max(),
            step: default_bucket_step(),
        }
    }
}

fn default_bucket_min() -> u32 {
    256
}
fn default_bucket_max() -> u32 {
    1024
}
fn default_bucket_step() -> u32 {
    64
}

/// One preprocessed item in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessItem {
    /// Item name (source file, `.flip` for the flipped copy).
    pub name: String,
    /// Source image, relative to the images folder.
    pub source: String,
    /// blake3 of the source image.
    pub image_hash: String,
    /// Caption.
    pub caption: String,
    /// Whether this is the flipped copy.
    pub flipped: bool,
    /// Size of the decoded image (after EXIF orientation).
    pub original: [u32; 2],
    /// Output size (the bucket, or resolution²).
    pub size: [u32; 2],
    /// The crop taken.
    pub crop: CropBox,
    /// The tensor file (safetensors, `image`: f32 `[3, h, w]` in [-1, 1]).
    pub tensor: BlobRef,
}

/// The `manifest.json` output of a preprocess stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessManifest {
    /// Items in source order (flipped copy after its original).
    pub items: Vec<PreprocessItem>,
    /// Images left out with `on_bad_image = "skip"`: (file, reason).
    pub skipped: Vec<(String, String)>,
}

/// What one image produced (cached per image as an item record).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ItemResult {
    original: [u32; 2],
    size: [u32; 2],
    crop: CropBox,
    tensors: Vec<BlobRef>,
}

impl PreprocessParams {
    pub(super) fn validate(&self) -> Result<(), ParamError> {
        if self.resolution < 8 || !self.resolution.is_multiple_of(8) {
            return Err(ParamError::new(
                "resolution",
                format!(
                    "resolution {} is not a positive multiple of 8",
                    self.resolution
                ),
                "use e.g. 512 (SD 1.x) or 64 (tiny models)",
            ));
        }
        if self.mode == ResizeMode::Bucket {
            let b = &self.bucket;
            if b.step == 0 || !b.step.is_multiple_of(8) {
                return Err(ParamError::new(
                    "bucket.step",
                    format!("bucket.step {} is not a positive multiple of 8", b.step),
                    "kohya's default is 64",
                ));
            }
            if b.min == 0 || b.min > b.max {
                return Err(ParamError::new(
                    "bucket.min",
                    format!(
                        "bucket.min {} must be positive and at most bucket.max {}",
                        b.min, b.max
                    ),
                    "e.g. min = 256, max = 1024",
                ));
            }
            if self.resolution < b.min || self.resolution > b.max {
                return Err(ParamError::new(
                    "resolution",
                    format!(
                        "resolution {} is outside the bucket range {}..={}",
                        self.resolution, b.min, b.max
                    ),
                    "widen [bucket] min/max or change the resolution",
                ));
            }
        }
        Ok(())
    }

    pub(super) fn normalize(&mut self) {
        if self.min_size.is_none() {
            self.min_size = Some(match self.mode {
                ResizeMode::Crop => self.resolution / 2,
                ResizeMode::Bucket => self.bucket.min,
            });
        }
    }

    fn min_size(&self) -> u32 {
        self.min_size.unwrap_or(self.resolution / 2)
    }

    /// What changes one item's result (hashed into item keys, and into the stage key).
    fn item_params(&self, settings: &PipelineSettings) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = v.as_object_mut() {
            map.remove("on_bad_image");
            if self.mode == ResizeMode::Crop {
                map.remove("bucket");
            }
            if self.crop == CropMode::Random {
                map.insert("seed".into(), settings.seed.into());
            }
        }
        v
    }

    pub(super) fn key_params(&self, settings: &PipelineSettings) -> serde_json::Value {
        let mut v = self.item_params(settings);
        if let Some(map) = v.as_object_mut() {
            map.insert(
                "on_bad_image".into(),
                serde_json::to_value(self.on_bad_image).unwrap_or_default(),
            );
        }
        v
    }

    pub(super) fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        let (caption_stage, caption_record) = ctx.upstream_of_kind("caption")?;
        let super::StageParams::Caption(caption_params) = &caption_stage.params else {
            bail!("stage `{}` is not a caption stage", caption_stage.name);
        };
        let manifest: CaptionManifest =
            ctx.read_json(caption_record, Artifact::Manifest.file_name())?;
        let images_dir = caption_params.images.clone();
        let item_params = self.item_params(ctx.settings);
        let buckets = (self.mode == ResizeMode::Bucket).then(|| {
            BucketSet::new(
                self.resolution,
                self.bucket.min,
                self.bucket.max,
                self.bucket.step,
            )
        });

        let bar = ctx.progress.bar(
            manifest.items.len() as u64,
            &format!("{} images", ctx.instance.name),
        );
        let computed = AtomicUsize::new(0);
        let results: Vec<Result<ItemResult, ItemFailure>> = manifest
            .items
            .par_iter()
            .map(|item| {
                let r = (|| {
                    ctx.check_cancelled().map_err(ItemFailure::Fatal)?;
                    let item_key = item_key(&item_params, &item.hash);
                    if let Some(record) = ctx
                        .item_record(&item_key)
                        .map_err(|e| ItemFailure::Fatal(e.into()))?
                        && let Ok(r) = serde_json::from_value::<ItemResult>(record.stats.clone())
                    {
                        ctx.store.touch(ITEMS, &item_key);
                        return Ok(r);
                    }
                    let started = std::time::Instant::now();
                    let path = images_dir.join(&item.file);
                    let bytes = std::fs::read(&path)
                        .with_context(|| format!("cannot read image {}", path.display()))
                        .map_err(ItemFailure::Fatal)?;
                    let hash = hash_bytes(&bytes);
                    if hash != item.hash {
                        return Err(ItemFailure::Fatal(anyhow::anyhow!(
                            "{} changed after the caption stage read it; run again",
                            path.display()
                        )));
                    }
                    ctx.hasher.remember(&path, &hash);
                    let result = self.process(&path, &bytes, &item.hash, ctx, buckets.as_ref())?;
                    let record = Record {
                        key: item_key.clone(),
                        kind: "preprocess-item".into(),
                        stage: ctx.instance.name.clone(),
                        material: None,
                        outputs: result
                            .tensors
                            .iter()
                            .enumerate()
                            .map(|(i, b)| (format!("tensor{i}"), b.clone()))
                            .collect(),
                        stats: serde_json::to_value(&result).unwrap_or_default(),
                        summary: item.file.clone(),
                        created_unix: now_unix(),
                        duration_s: started.elapsed().as_secs_f64(),
                        tool_version: env!("CARGO_PKG_VERSION").into(),
                    };
                    ctx.store
                        .put_record(ITEMS, &item_key, &record)
                        .map_err(|e| ItemFailure::Fatal(e.into()))?;
                    computed.fetch_add(1, Ordering::Relaxed);
                    Ok(result)
                })();
                bar.inc(1);
                r
            })
            .collect();
        bar.finish_and_clear();

        let mut items = Vec::new();
        let mut bad = Vec::new();
        for (item, result) in manifest.items.iter().zip(results) {
            match result {
                Ok(r) => {
                    for (i, tensor) in r.tensors.iter().enumerate() {
                        let flipped = i == 1;
                        items.push(PreprocessItem {
                            name: if flipped {
                                format!("{}.flip", item.file)
                            } else {
                                item.file.clone()
                            },
                            source: item.file.clone(),
                            image_hash: item.hash.clone(),
                            caption: item.caption.clone(),
                            flipped,
                            original: r.original,
                            size: r.size,
                            crop: r.crop,
                            tensor: tensor.clone(),
                        });
                    }
                }
                Err(ItemFailure::Bad(e)) => bad.push((item.file.clone(), e.to_string())),
                Err(ItemFailure::Fatal(e)) => return Err(e),
            }
        }
        if !bad.is_empty() && self.on_bad_image == OnBadImage::Fail {
            bail!(
                "{} bad image(s):\n  {}\nfix or remove them, or set on_bad_image = \"skip\"",
                bad.len(),
                bad.iter()
                    .map(|(_, e)| e.as_str())
                    .collect::<Vec<_>>()
                    .join("\n  ")
            );
        }
        if items.is_empty() {
            bail!("no usable images: all {} were skipped", bad.len());
        }
        for (file, reason) in &bad {
            tracing::warn!("skipped {file}: {reason}");
        }

        let computed = computed.into_inner();
        let sources = manifest.items.len() - bad.len();
        let manifest = PreprocessManifest {
            items,
            skipped: bad,
        };
        let mut result = StageResult::default();
        for item in &manifest.items {
            result.outputs.insert(
                // The dataset's folders are kept: `a/x.png` and `a__x.png` are two files.
                format!("items/{}.safetensors", item.name),
                item.tensor.clone(),
            );
        }
        result.outputs.insert(
            Artifact::Manifest.file_name().into(),
            ctx.store
                .put_bytes(&serde_json::to_vec_pretty(&manifest)?)?,
        );
        let report = bucket_report(&manifest);
        result.outputs.insert(
            "buckets.json".into(),
            ctx.store.put_bytes(&serde_json::to_vec_pretty(&report)?)?,
        );
        result
            .stats
            .insert("items".into(), manifest.items.len().into());
        result
            .stats
            .insert("images_computed".into(), computed.into());
        result
            .stats
            .insert("images_reused".into(), (sources - computed).into());
        result
            .stats
            .insert("skipped".into(), manifest.skipped.len().into());
        let sizes: Vec<String> = report
            .buckets
            .iter()
            .map(|b| format!("{}x{}:{}", b.size[0], b.size[1], b.count))
            .collect();
        result.summary = format!(
            "{} items ({computed} computed, {} reused{}), sizes {}",
            manifest.items.len(),
            sources - computed,
            if manifest.skipped.is_empty() {
                String::new()
            } else {
                format!(", {} skipped", manifest.skipped.len())
            },
            sizes.join(" ")
        );
        Ok(result)
    }

    /// Decodes, checks, fits and stores one image (and its flipped copy).
    fn process(
        &self,
        path: &Path,
        bytes: &[u8],
        image_hash: &str,
        ctx: &StageContext<'_>,
        buckets: Option<&BucketSet>,
    ) -> Result<ItemResult, ItemFailure> {
        let img = decode_image(path, bytes).map_err(ItemFailure::Bad)?;
        let (w, h) = img.dimensions();
        if w.min(h) < self.min_size() {
            return Err(ItemFailure::Bad(ImageError::TooSmall {
                path: path.to_path_buf(),
                width: w,
                height: h,
                min: self.min_size(),
            }));
        }
        let target = match buckets {
            Some(set) => set
                .assign(w, h)
                .ok_or_else(|| ItemFailure::Fatal(anyhow::anyhow!("no bucket fits {w}x{h}")))?,
            None => Bucket {
                width: self.resolution,
                height: self.resolution,
            },
        };
        let seed = crop_seed(ctx.settings.seed, image_hash);
        let crop_mode = self.crop;
        let (cropped, crop) =
            fit_and_crop(
                &img,
                target.width,
                target.height,
                |max_x, max_y| match crop_mode {
                    CropMode::Center => (max_x / 2, max_y / 2),
                    CropMode::Random => {
                        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                        (rng.random_range(0..=max_x), rng.random_range(0..=max_y))
                    }
                },
            );
        let mut tensors = vec![self.store_tensor(ctx, &cropped, path, false)?];
        if self.flip {
            let flipped = image::imageops::flip_horizontal(&cropped);
            tensors.push(self.store_tensor(ctx, &flipped, path, true)?);
        }
        Ok(ItemResult {
            original: [w, h],
            size: [target.width, target.height],
            crop,
            tensors,
        })
    }

    fn store_tensor(
        &self,
        ctx: &StageContext<'_>,
        img: &image::RgbImage,
        path: &Path,
        flipped: bool,
    ) -> Result<BlobRef, ItemFailure> {
        let (w, h) = img.dimensions();
        let data = to_chw_tensor(img);
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![3, h as usize, w as usize],
            &bytes,
        )
        .map_err(|e| ItemFailure::Fatal(anyhow::anyhow!("tensor for {}: {e}", path.display())))?;
        // One metadata key: safetensors writes its metadata map in hash order, and the bytes
        // must not vary between runs (they are content-addressed).
        let description = serde_json::json!({
            "source": path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            "flipped": flipped,
            "range": [-1.0, 1.0],
            "layout": "CHW",
        });
        let meta = HashMap::from([("sdpipe".to_string(), description.to_string())]);
        let file = safetensors::tensor::serialize([("image", view)], Some(meta)).map_err(|e| {
            ItemFailure::Fatal(anyhow::anyhow!("serializing {}: {e}", path.display()))
        })?;
        ctx.store
            .put_bytes(&file)
            .map_err(|e| ItemFailure::Fatal(e.into()))
    }
}

enum ItemFailure {
    /// The image is unusable (skippable).
    Bad(ImageError),
    /// Anything else fails the stage.
    Fatal(anyhow::Error),
}

fn item_key(item_params: &serde_json::Value, image_hash: &str) -> String {
    let material = serde_json::json!({
        "schema": KEY_SCHEMA,
        "kind": "preprocess-item",
        "version": VERSION,
        "params": item_params,
        "image": image_hash,
    });
    hash_bytes(crate::cache::canonical_json(&material).as_bytes())
}

fn crop_seed(seed: u64, image_hash: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(image_hash.as_bytes());
    let bytes = h.finalize();
    u64::from_le_bytes(bytes.as_bytes()[..8].try_into().unwrap_or_default())
}

/// `buckets.json`: every item's bucket and crop, and a count per size.
#[derive(Debug, Serialize)]
struct BucketReport {
    buckets: Vec<BucketCount>,
    items: BTreeMap<String, ([u32; 2], CropBox)>,
}

#[derive(Debug, Serialize)]
struct BucketCount {
    size: [u32; 2],
    count: usize,
}

fn bucket_report(manifest: &PreprocessManifest) -> BucketReport {
    let mut counts: BTreeMap<[u32; 2], usize> = BTreeMap::new();
    let mut items = BTreeMap::new();
    for item in &manifest.items {
        *counts.entry(item.size).or_default() += 1;
        items.insert(item.name.clone(), (item.size, item.crop));
    }
    BucketReport {
        buckets: counts
            .into_iter()
            .map(|(size, count)| BucketCount { size, count })
            .collect(),
        items,
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
