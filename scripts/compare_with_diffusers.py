#!/usr/bin/env python3
"""Loads sdpipe's training outputs with diffusers and checks they sample what `sdpipe sample` samples.

Not part of CI (it needs PyTorch, diffusers, transformers and peft). It:

1. trains a LoRA, a textual-inversion embedding and a DreamBooth checkpoint with `sdpipe run` on
   a tiny diffusers model (a few steps each, in a temporary project);
2. draws one set of initial latents with torch and saves it for `sdpipe sample --init-latents`;
3. for each artifact, samples the same prompt with the same latents, sampler (DDIM), steps and
   guidance twice: with diffusers (`load_lora_weights`, `load_textual_inversion`,
   `from_single_file`) and with `sdpipe sample` (`--lora`, `--embedding`, `--model`);
4. prints the largest absolute difference of the output images ([0, 1] floats) and fails above
   the tolerance (1e-3, the fixtures' tolerance for a whole pipeline).

Usage (from the repository root, after `cargo build --release`):

    pip install torch diffusers transformers peft safetensors
    python3 scripts/compare_with_diffusers.py --model ../shared/fixtures/tiny-sd

`--model` must be a complete diffusers folder (with `tokenizer/`).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

TOLERANCE = 1e-3

PIPELINE = """
[pipeline]
name = "cmp"
seed = 3
base_model = "{model}"

[stage.caption]
kind = "caption"
images = "images"
template = "a photo of {{token}}"
token = "zorb"

[stage.preprocess]
kind = "preprocess"
needs = ["caption"]
resolution = 16

[stage.latents]
kind = "encode_latents"
needs = ["preprocess"]

[stage.class]
kind = "class_images"
prompt = "a photo of a shape"
count = 2
steps = 3
width = 16
height = 16

[stage.train]
kind = "train"
needs = ["latents", "class"]
matrix.method = ["lora", "textual_inversion", "dreambooth"]
steps = 20
lr = 1e-3

[stage.train.lora]
rank = 4
alpha = 2
text_encoder = true

[stage.train.textual_inversion]
token = "zorb"
init_word = "shape"

[stage.train.dreambooth]
save_dtype = "f32"
train_text_encoder = true
"""


def run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if result.returncode != 0:
        sys.exit(f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stdout}{result.stderr}")
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a complete diffusers folder (with tokenizer/)")
    ap.add_argument("--sdpipe", default="target/release/sdpipe", help="the sdpipe binary")
    ap.add_argument("--images", default="datasets/toy-shapes", help="training images")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--keep", action="store_true", help="keep the temporary project")
    args = ap.parse_args()

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    model = os.path.abspath(args.model)
    sdpipe = os.path.abspath(args.sdpipe)
    work = tempfile.mkdtemp(prefix="sdpipe-compare-")
    shutil.copytree(args.images, os.path.join(work, "images"))
    with open(os.path.join(work, "p.toml"), "w") as f:
        f.write(PIPELINE.format(model=model))
    print(f"training in {work} ...", flush=True)
    run([sdpipe, "run", "p.toml"], cwd=work)
    out = os.path.join(work, "outputs", "cmp")
    lora = os.path.join(out, "train@method=lora", "lora.safetensors")
    embedding = os.path.join(out, "train@method=textual_inversion", "embedding.safetensors")
    checkpoint = os.path.join(out, "train@method=dreambooth", "model.safetensors")
    for path in (lora, embedding, checkpoint):
        if not os.path.exists(path):
            sys.exit(f"missing training output {path}; outputs: {os.listdir(out)}")

    # One set of initial latents for both implementations.
    generator = torch.Generator().manual_seed(0)
    with open(os.path.join(model, "unet", "config.json")) as f:
        unet_cfg = json.load(f)
    factor = 2 ** (len(unet_cfg["block_out_channels"]) - 1)
    vae_factor = 2 ** (len(json.load(open(os.path.join(model, "vae", "config.json")))["block_out_channels"]) - 1)
    side = 16
    latents = torch.randn((1, unet_cfg["in_channels"], side // vae_factor, side // vae_factor), generator=generator)
    assert (side // vae_factor) % factor == 0
    latents_file = os.path.join(work, "latents.safetensors")
    save_file({"latents": latents.contiguous()}, latents_file)

    prompt = "a photo of zorb"

    def diffusers_image(pipe):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            image = pipe(
                prompt,
                negative_prompt="",
                num_inference_steps=args.steps,
                guidance_scale=args.cfg,
                latents=latents.clone(),
                height=side,
                width=side,
                output_type="pt",
            ).images
        return image.float()

    def sdpipe_image(name, extra):
        tensor = os.path.join(work, f"{name}.safetensors")
        run(
            [
                sdpipe, "sample", "--prompt", prompt, "--negative", "",
                "--steps", str(args.steps), "--sampler", "ddim", "--cfg", str(args.cfg),
                "--width", str(side), "--height", str(side),
                "--init-latents", latents_file,
                "--out", os.path.join(work, f"{name}.png"), "--out-tensor", tensor,
            ] + extra,
            cwd=work,
        )
        return load_file(tensor)["image"].float()

    def base_pipe():
        return StableDiffusionPipeline.from_pretrained(model, safety_checker=None, local_files_only=True)

    rows = []

    pipe = base_pipe()
    rows.append(("base model", diffusers_image(pipe), sdpipe_image("base", ["--model", model])))

    pipe = base_pipe()
    pipe.load_lora_weights(lora)
    pipe.fuse_lora(lora_scale=1.0)
    rows.append(("LoRA, UNet + text encoder (kohya, load_lora_weights)", diffusers_image(pipe),
                 sdpipe_image("lora", ["--model", model, "--lora", f"{lora}:1.0"])))

    pipe = base_pipe()
    pipe.load_textual_inversion(embedding, token="zorb")
    rows.append(("embedding (A1111 file, load_textual_inversion)", diffusers_image(pipe),
                 sdpipe_image("embedding", ["--model", model, "--embedding", f"{embedding}:zorb"])))

    pipe = StableDiffusionPipeline.from_single_file(
        checkpoint, config=model, safety_checker=None, local_files_only=True
    )
    rows.append(("DreamBooth, UNet + text encoder (from_single_file)", diffusers_image(pipe),
                 sdpipe_image("dreambooth", ["--model", checkpoint, "--config", model])))

    base = rows[0][2]
    failed = False
    print(f"\n{'artifact':50} {'max |diffusers - sdpipe|':>26} {'changes the image by':>22}")
    for name, ours_ref, ours in rows:
        diff = (ours_ref - ours).abs().max().item()
        effect = (ours - base).abs().max().item()
        ok = diff <= TOLERANCE
        failed |= not ok
        print(f"{name:50} {diff:26.2e} {effect:22.3f}  {'ok' if ok else 'FAIL'}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
