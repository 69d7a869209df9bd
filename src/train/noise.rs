//! Shaped training noise, as kohya sd-scripts draws it: the noise offset (Guttenberg 2023,
//! "Diffusion With Offset Noise"), with kohya's adaptive scale, and multi-resolution
//! ("pyramid") noise. Both change only the noise the UNet learns to remove; with neither set
//! the noise is the plain Gaussian it always was, bit for bit.

use rand::{RngExt, SeedableRng};

use crate::diffusion::schedulers::SeededNoise;

/// How the Gaussian noise of a training batch is shaped. The default leaves it plain.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct NoiseShaping {
    /// kohya's `noise_offset`: each (sample, channel) plane of the noise is shifted by
    /// `offset · n`, `n ~ N(0, 1)`, so the model learns to change an image's overall
    /// brightness (very dark or light images). 0 = off; 0.05–0.1 is usual.
    pub offset: f64,
    /// kohya's `adaptive_noise_scale`: the offset grows by this times `|mean|` of the
    /// (sample, channel) plane of the latents (clamped at 0).
    pub adaptive_scale: Option<f64>,
    /// kohya's `multires_noise_iterations`: noise at up to this many coarser resolutions,
    /// bilinearly upsampled, is added before the result is scaled back to unit variance.
    /// 0 = off; 6–10 is usual.
    pub multires_iterations: usize,
    /// kohya's `multires_noise_discount`: the weight of level `i` is `discount^i` (default 0.3).
    pub multires_discount: f64,
}

impl NoiseShaping {
    /// Whether the noise stays the plain Gaussian.
    pub fn is_plain(&self) -> bool {
        self.offset == 0.0 && self.multires_iterations == 0
    }

    /// Shapes `noise` (`[b, c, h, w]` row-major, as drawn) for the batch `latents` (same
    /// shape), drawing its own random numbers from `seed`: the offset first, then the pyramid,
    /// in kohya's order.
    pub fn apply(&self, noise: &mut [f32], latents: &[f32], shape: [usize; 4], seed: u64) {
        if self.is_plain() {
            return;
        }
        let [b, c, h, w] = shape;
        let plane = h * w;
        let mut normal = SeededNoise::new(seed);
        if self.offset != 0.0 {
            for (noise, latents) in noise
                .chunks_mut(plane)
                .zip(latents.chunks(plane))
                .take(b * c)
            {
                let mut offset = self.offset;
                if let Some(scale) = self.adaptive_scale {
                    let mean = latents.iter().map(|&v| v as f64).sum::<f64>() / plane as f64;
                    offset = (offset + scale * mean.abs()).max(0.0);
                }
                let shift = (offset * normal.next_normal()) as f32;
                noise.iter_mut().for_each(|v| *v += shift);
            }
        }
        if self.multires_iterations > 0 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
            for i in 0..self.multires_iterations {
                // kohya: a random factor in [2, 4) rather than always 2×.
                let r: f64 = rng.random_range(2.0..4.0);
                let shrink = r.powi(i as i32);
                let hn = ((h as f64 / shrink) as usize).max(1);
                let wn = ((w as f64 / shrink) as usize).max(1);
                let weight = self.multires_discount.powi(i as i32) as f32;
                for p in 0..b * c {
                    let coarse: Vec<f32> =
                        (0..hn * wn).map(|_| normal.next_normal() as f32).collect();
                    let up = upsample_bilinear(&coarse, hn, wn, h, w);
                    for (v, u) in noise[p * plane..(p + 1) * plane].iter_mut().zip(up) {
                        *v += u * weight;
                    }
                }
                if hn == 1 || wn == 1 {
                    break;
                }
            }
            // Back to unit variance (torch's unbiased std over every element).
            let n = noise.len() as f64;
            let mean = noise.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = noise
                .iter()
                .map(|&v| (v as f64 - mean).powi(2))
                .sum::<f64>()
                / (n - 1.0).max(1.0);
            let inv = (1.0 / var.sqrt()) as f32;
            noise.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

/// Bilinear resampling of one `[h, w]` plane to `[out_h, out_w]`, as torch's
/// `nn.Upsample(size, mode="bilinear")` (`align_corners=False`) computes it: each output pixel
/// samples the input at `(o + 0.5) · in / out − 0.5`, clamped at 0.
pub fn upsample_bilinear(src: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    let taps = |out: usize, size: usize| -> Vec<(usize, usize, f32)> {
        let scale = size as f32 / out as f32;
        (0..out)
            .map(|o| {
                let x = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (x as usize).min(size - 1);
                let i1 = (i0 + 1).min(size - 1);
                (i0, i1, x - i0 as f32)
            })
            .collect()
    };
    let rows = taps(out_h, h);
    let cols = taps(out_w, w);
    let mut out = Vec::with_capacity(out_h * out_w);
    for &(y0, y1, fy) in &rows {
        for &(x0, x1, fx) in &cols {
            let top = src[y0 * w + x0] * (1.0 - fx) + src[y0 * w + x1] * fx;
            let bottom = src[y1 * w + x0] * (1.0 - fx) + src[y1 * w + x1] * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torch: `nn.Upsample(size=(4, 4), mode="bilinear")(tensor([[[[1., 2.], [3., 4.]]]]))`.
    #[test]
    fn bilinear_upsampling_matches_torch() {
        let up = upsample_bilinear(&[1.0, 2.0, 3.0, 4.0], 2, 2, 4, 4);
        let torch = [
            1.0, 1.25, 1.75, 2.0, 1.5, 1.75, 2.25, 2.5, 2.5, 2.75, 3.25, 3.5, 3.0, 3.25, 3.75, 4.0,
        ];
        for (a, b) in up.iter().zip(torch) {
            assert!((a - b).abs() < 1e-6, "{up:?}");
        }
        // A 1×1 plane spreads to a constant one.
        assert_eq!(upsample_bilinear(&[0.5], 1, 1, 2, 3), vec![0.5; 6]);
    }

    fn batch(seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut n = SeededNoise::new(seed);
        let noise = (0..2 * 4 * 8 * 8).map(|_| n.next_normal() as f32).collect();
        let latents = (0..2 * 4 * 8 * 8)
            .map(|i| n.next_normal() as f32 + if i < 64 { 3.0 } else { 0.0 })
            .collect();
        (noise, latents)
    }

    #[test]
    fn the_offset_shifts_each_plane_by_one_constant() {
        let (plain, latents) = batch(1);
        let shaping = NoiseShaping {
            offset: 0.1,
            ..NoiseShaping::default()
        };
        let mut noise = plain.clone();
        shaping.apply(&mut noise, &latents, [2, 4, 8, 8], 7);
        let shifts: Vec<f32> = (0..8).map(|p| noise[p * 64] - plain[p * 64]).collect();
        for p in 0..8 {
            for k in 0..64 {
                let d = noise[p * 64 + k] - plain[p * 64 + k];
                assert!(
                    (d - shifts[p]).abs() < 1e-6,
                    "plane {p} is not shifted uniformly"
                );
            }
        }
        assert!(shifts.iter().any(|s| s.abs() > 1e-3), "{shifts:?}");
        // Adaptive: the plane whose latents average 3 gets offset 0.1 + 0.5·|mean| ≈ 1.6 times
        // the same normal draw.
        let mut adaptive = plain.clone();
        NoiseShaping {
            adaptive_scale: Some(0.5),
            ..shaping
        }
        .apply(&mut adaptive, &latents, [2, 4, 8, 8], 7);
        let mean0 = latents[..64].iter().map(|&v| v as f64).sum::<f64>() / 64.0;
        let expected = shifts[0] as f64 * (0.1 + 0.5 * mean0.abs()) / 0.1;
        assert!(((adaptive[0] - plain[0]) as f64 - expected).abs() < 1e-5);
        // Plain shaping leaves the noise as drawn.
        let mut same = plain.clone();
        NoiseShaping::default().apply(&mut same, &latents, [2, 4, 8, 8], 7);
        assert_eq!(same, plain);
    }

    #[test]
    fn pyramid_noise_is_smoother_and_back_to_unit_variance() {
        let mut n = SeededNoise::new(2);
        let plain: Vec<f32> = (0..4 * 16 * 16).map(|_| n.next_normal() as f32).collect();
        let mut noise = plain.clone();
        NoiseShaping {
            multires_iterations: 6,
            multires_discount: 0.9,
            ..NoiseShaping::default()
        }
        .apply(&mut noise, &plain, [1, 4, 16, 16], 3);
        let n = noise.len() as f64;
        let mean = noise.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = noise
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0);
        assert!((var - 1.0).abs() < 1e-5, "variance {var}");
        // Horizontal neighbours are correlated now (the coarse levels), unlike white noise.
        let corr = |x: &[f32]| {
            let pairs: Vec<usize> = (0..x.len() - 1).filter(|i| (i + 1) % 16 != 0).collect();
            pairs
                .iter()
                .map(|&i| x[i] as f64 * x[i + 1] as f64)
                .sum::<f64>()
                / pairs.len() as f64
        };
        let (shaped, white) = (corr(&noise), corr(&plain));
        assert!(shaped > 0.3 && white.abs() < 0.1, "{shaped} vs {white}");
    }
}
