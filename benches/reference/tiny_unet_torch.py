"""PyTorch + diffusers side of `cargo run --release --example bench_unet`.

Times the tiny fixture UNet (tests/fixtures/tiny-sd/unet) on the CPU with the same shapes and
the same work as the Rust example: batch 2, 8x8 latents, 77 context tokens, timesteps
[10, 500]; forward; and forward + backward of an MSE loss with the gradient flowing to the
input only (frozen weights). Prints min and median milliseconds over N iterations after 3
warm-up iterations, in the Rust example's format.

Needs torch and diffusers (not used by CI):
    python3 benches/reference/tiny_unet_torch.py [iterations]
"""
import os
import sys
import time

import torch
from diffusers import UNet2DConditionModel


def timed(label, fn, iters):
    for _ in range(3):
        fn()
    ms = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - start) * 1e3)
    ms.sort()
    print(f"{label}: min {ms[0]:.2f} ms, median {ms[len(ms) // 2]:.2f} ms ({iters} iterations)")


def main():
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    unet = UNet2DConditionModel.from_pretrained(os.path.join(root, "tests", "fixtures", "tiny-sd", "unet"))
    unet.eval().requires_grad_(False)
    torch.manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 8, 8)
    noise = torch.randn_like(sample)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    timesteps = torch.tensor([10, 500])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    def forward():
        with torch.no_grad():
            unet(sample, timesteps, context).sample

    def forward_backward():
        x = sample.clone().requires_grad_(True)
        loss = torch.nn.functional.mse_loss(unet(x, timesteps, context).sample, noise)
        loss.backward()
        return x.grad

    timed("tiny UNet forward", forward, iters)
    timed("tiny UNet forward+backward", forward_backward, iters)


if __name__ == "__main__":
    main()
