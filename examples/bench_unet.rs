//! Times the tiny fixture UNet (tests/fixtures/tiny-sd) on the CPU: forward, and forward +
//! backward of an MSE loss with the gradient flowing to the input (frozen weights, as when
//! training LoRA / textual inversion). Batch 2, 8x8 latents, 77 context tokens, like the
//! training golden.
//!
//! `cargo run --release --example bench_unet [iterations]`
//!
//! Measured 2026-11-28 on the project's shared 2-core CPU machine (release profile), run back
//! to back with `python3 benches/reference/tiny_unet_torch.py 60` (torch 2.15, diffusers 0.42),
//! minimum of 60 iterations (the cores are shared with other jobs: compare minima; PyTorch's
//! 2-thread runs suffered most from the contention, so its least-disturbed minima are used):
//!
//! | | Rust | PyTorch | ratio |
//! |---|---|---|---|
//! | forward, 2 threads | 4.8-4.9 ms (6.7 in 1 of 7 runs) | 8.9 ms | 0.55x |
//! | forward + backward, 2 threads | 10.3-11.2 ms (12.7, 14.8 in 2 of 7) | 17.6 ms | 0.61x |
//! | forward, 1 thread each, 3 pairs | 4.86 ms | 8.56-9.08 ms | 0.55x |
//! | forward + backward, 1 thread each, 3 pairs | 10.57-10.66 ms | 17.2-18.0 ms | 0.61x |
//!
//! Before the fused CPU kernels (src/diffusion/nn/host.rs) it was 9.1-10.3 ms forward and
//! 26.7-32 ms forward + backward (~1.6x PyTorch). See docs/benchmarks.md for the breakdown.

use std::time::Instant;

use dfdx::prelude::*;
use sdpipe::diffusion::Checkpoint;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iters: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd");
    let dev = Cpu::default();
    let unet = Checkpoint::open(&dir)?.load_unet(&dev)?;
    let (b, c, h, w) = (2, unet.config.in_channels, 8, 8);
    let ctx_dim = unet.config.cross_attention_dim;
    let sample: Tensor<(usize, usize, usize, usize), f32, _> =
        dev.sample_normal_like(&(b, c, h, w));
    let noise: Tensor<(usize, usize, usize, usize), f32, _> = dev.sample_normal_like(&(b, c, h, w));
    let context: Tensor<(usize, usize, usize), f32, _> = dev.sample_normal_like(&(b, 77, ctx_dim));
    let timesteps = [10.0f32, 500.0];

    let time = |label: &str, f: &mut dyn FnMut()| {
        for _ in 0..3 {
            f();
        }
        // min and median: the machine may be shared, the minimum is the least disturbed run
        let mut ms: Vec<f64> = (0..iters)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        println!(
            "{label}: min {:.2} ms, median {:.2} ms ({iters} iterations)",
            ms[0],
            ms[ms.len() / 2]
        );
    };
    time("tiny UNet forward", &mut || {
        let out = unet
            .forward(sample.clone(), &timesteps, context.clone())
            .expect("forward");
        std::hint::black_box(out.as_vec());
    });
    time("tiny UNet forward+backward", &mut || {
        let out = unet
            .forward(sample.leaky_trace(), &timesteps, context.retaped())
            .expect("forward");
        let loss = mse_loss(out, noise.clone());
        let grads = loss.backward();
        std::hint::black_box(grads.get(&sample).as_vec());
    });
    Ok(())
}
