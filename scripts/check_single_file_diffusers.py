"""Checks that diffusers loads an sdpipe single-file checkpoint (not run in CI: needs torch,
diffusers and transformers).

    python3 scripts/check_single_file_diffusers.py MODEL.safetensors DIFFUSERS_FOLDER [--exact]

Loads MODEL with `StableDiffusionPipeline.from_single_file(MODEL, config=FOLDER)`, reports any
missing or unexpected key of the converted UNet / VAE / text encoder, and compares every tensor
with the pipeline loaded from FOLDER: with --exact (an f32 file written from FOLDER's weights)
they must be identical; otherwise the largest difference is printed.
"""

import sys

import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_ldm_clip_checkpoint,
)
from safetensors.torch import load_file


def main():
    path, folder = sys.argv[1], sys.argv[2]
    exact = "--exact" in sys.argv
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, torch_dtype=torch.float32)
    sd = load_file(path)
    problems = []
    unet = convert_ldm_unet_checkpoint(sd, ref.unet.config)
    vae = convert_ldm_vae_checkpoint(sd, ref.vae.config)
    clip = convert_ldm_clip_checkpoint(sd)
    for name, converted, model in [("unet", unet, ref.unet), ("vae", vae, ref.vae), ("text_encoder", clip, ref.text_encoder)]:
        # transformers 5 drops CLIPTextModel's `text_model.` prefix from its state dict
        strip = lambda k: k[len("text_model."):] if k.startswith("text_model.") else k
        want = {strip(k) for k in model.state_dict().keys()}
        got = {strip(k) for k in converted.keys()}
        missing = sorted(want - got)
        unexpected = sorted(got - want)
        # transformers keeps position_ids as a non-persistent buffer in recent versions
        unexpected = [k for k in unexpected if not k.endswith("position_ids")]
        missing = [k for k in missing if not k.endswith("position_ids")]
        print(f"{name}: {len(got)} converted tensors, missing {len(missing)}, unexpected {len(unexpected)}")
        if missing or unexpected:
            problems.append((name, missing[:5], unexpected[:5]))
    pipe = StableDiffusionPipeline.from_single_file(path, config=folder, safety_checker=None, torch_dtype=torch.float32)
    worst = 0.0
    for name in ["unet", "vae", "text_encoder"]:
        a = getattr(pipe, name).state_dict()
        b = getattr(ref, name).state_dict()
        for k, v in b.items():
            if k.endswith("position_ids"):
                continue
            if k not in a:
                problems.append((name, [k], []))
                continue
            d = (a[k].float() - v.float()).abs().max().item() if v.numel() else 0.0
            worst = max(worst, d)
    print(f"from_single_file vs from_pretrained: max abs tensor difference {worst:e}")
    if exact and worst != 0.0:
        problems.append(("values", [f"max difference {worst}"], []))
    if problems:
        print("PROBLEMS:", problems)
        sys.exit(1)
    print("OK: diffusers loads the file with no missing or unexpected keys")


if __name__ == "__main__":
    main()
