//! Aspect-ratio buckets as kohya sd-scripts makes them: every (w, h) on a `step` grid between
//! `min` and `max` whose area is at most `max_area`, each image going to the bucket of the
//! nearest aspect ratio.

use serde::{Deserialize, Serialize};

/// A bucket resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Bucket {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// The set of buckets for one resolution.
#[derive(Debug, Clone)]
pub struct BucketSet {
    buckets: Vec<Bucket>,
}

impl BucketSet {
    /// Buckets for `resolution`² pixels of area, sides in `[min, max]` multiples of `step`.
    pub fn new(resolution: u32, min: u32, max: u32, step: u32) -> BucketSet {
        let max_area = u64::from(resolution) * u64::from(resolution);
        let step = step.max(1);
        let mut buckets = Vec::new();
        let square = (resolution / step) * step;
        if square >= min && square <= max {
            buckets.push(Bucket {
                width: square,
                height: square,
            });
        }
        let mut width = min.div_ceil(step) * step;
        while width <= max {
            let height = ((max_area / u64::from(width)) as u32 / step * step).min(max);
            if height >= min {
                buckets.push(Bucket { width, height });
                buckets.push(Bucket {
                    width: height,
                    height: width,
                });
            }
            width += step;
        }
        buckets.sort();
        buckets.dedup();
        BucketSet { buckets }
    }

    /// The bucket whose aspect ratio is nearest (in log space) to `width`:`height`.
    pub fn assign(&self, width: u32, height: u32) -> Option<Bucket> {
        let ratio = (f64::from(width) / f64::from(height)).ln();
        self.buckets.iter().copied().min_by(|a, b| {
            let da = ((f64::from(a.width) / f64::from(a.height)).ln() - ratio).abs();
            let db = ((f64::from(b.width) / f64::from(b.height)).ln() - ratio).abs();
            da.total_cmp(&db)
                .then((b.width * b.height).cmp(&(a.width * a.height)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_stay_in_bounds_and_area() {
        let set = BucketSet::new(512, 256, 1024, 64);
        assert!(set.buckets.contains(&Bucket {
            width: 512,
            height: 512
        }));
        for b in &set.buckets {
            assert!(b.width % 64 == 0 && b.height % 64 == 0);
            assert!(b.width >= 256 && b.height >= 256 && b.width <= 1024 && b.height <= 1024);
            assert!(u64::from(b.width) * u64::from(b.height) <= 512 * 512);
        }
    }

    #[test]
    fn images_go_to_the_nearest_aspect() {
        let set = BucketSet::new(512, 256, 1024, 64);
        assert_eq!(
            set.assign(1000, 1000),
            Some(Bucket {
                width: 512,
                height: 512
            })
        );
        let wide = set.assign(1600, 900).unwrap();
        assert!(wide.width > wide.height);
        let tall = set.assign(900, 1600).unwrap();
        assert_eq!((tall.width, tall.height), (wide.height, wide.width));
    }
}
