#!/usr/bin/env python3
"""Checks that `sdpipe sample --lora` applies sdpipe's LyCORIS adapters as independent code does.

Not part of CI (it needs PyTorch, diffusers, transformers and peft). It trains one adapter per
method with `sdpipe run` on a tiny diffusers model (`method = "locon" | "loha" | "lokr" |
"dora"`, UNet only, kohya/LyCORIS keys), draws one set of initial latents, and for each file
samples the same prompt, latents, sampler (DDIM), steps and guidance with a reference and with
`sdpipe sample --lora FILE:1.0`. The rows:

- base model: diffusers against `sdpipe sample` without an adapter (the harness itself).
- LoCon: diffusers' `load_lora_weights` + `fuse_lora(lora_scale=1.0)`, which also has to load
  every key: each of the file's modules (convolutions included) must have a fused weight that
  differs from the base model's, and a diffusers/peft warning about unexpected, missing or
  filtered keys fails the row (all warnings are printed).
- LoHa, LoKr: PEFT's own modules (`LoHaConfig` / `LoKrConfig` injected into the UNet at exactly
  the file's module paths, `decompose_both=False`, `decompose_factor=-1`), the file's tensors
  copied into PEFT's parameters (shapes checked). PEFT scales LoKr by alpha/r even when both
  Kronecker factors are full, where LyCORIS (and the file's convention) uses 1; for such modules
  the PEFT config gets alpha = r. Should PEFT fail, a plain-torch merge from the formulas
  (ΔW = (w1_a·w1_b)⊙(w2_a·w2_b)·alpha/r, ΔW = w1⊗w2·scale) replaces it.
- DoRA: a plain-torch merge into the UNet's weights of W' = V·dora_scale/(‖V‖+eps),
  V = W + alpha/r·up·down, the norm per input column (LyCORIS/ComfyUI/A1111 convention; PEFT's
  DoRA normalises per output row, so it cannot serve as the reference).

Each row also says what diffusers' `load_lora_weights` (+ `fuse_lora`) does with the file
(diffusers has no LoHa/LoKr loader and drops `dora_scale`), then max |reference - sdpipe| over
the [0, 1] images and how much the adapter changes sdpipe's image against the base model (must
be clearly > 0, so the check is not vacuous); a row fails above 1e-3.

Usage (from the repository root, after `cargo build --release`):

    pip install torch diffusers transformers peft safetensors
    python3 scripts/compare_adapters_with_reference.py --model tests/fixtures/tiny-sd

and, for LoHa, LoKr and DoRA on convolutions too and LoKr with a low-rank `w2` scaled by
alpha/r = 2:

    python3 scripts/compare_adapters_with_reference.py --rank 1 \
        --targets to_q,to_k,to_v,to_out.0,conv1,conv2
"""

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections import defaultdict

import torch
from safetensors.torch import load_file, save_file

TOLERANCE = 1e-3
METHODS = ["locon", "loha", "lokr", "dora"]
# What diffusers/peft say when part of a file is left out ("unexpected keys", "missing keys", ...).
SKIPPED_KEYS = ("unexpected keys", "missing keys", "not loaded", "not been correctly", "filter out")

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

[stage.train]
kind = "train"
needs = ["latents"]
matrix.method = ["locon", "loha", "lokr", "dora"]
steps = 30
lr = 1e-2

[stage.train.lora]
rank = {rank}
alpha = 2
{targets}
"""


def run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if result.returncode != 0:
        sys.exit(f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stdout}{result.stderr}")
    return result


@contextlib.contextmanager
def captured_warnings():
    """Collects what diffusers, peft and transformers log at WARNING or `warnings.warn`."""
    handler, messages = logging.Handler(logging.WARNING), []
    handler.emit = lambda record: messages.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        try:
            yield messages
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
            messages += [str(w.message) for w in recorded]


def short(text, n=110):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def modules_of(path, unet):
    """The file's modules: {UNet module path: {part: tensor}} (kohya `lora_unet_` names)."""
    by_flat = {name.replace(".", "_"): name for name, _ in unet.named_modules() if name}
    modules = defaultdict(dict)
    for key, tensor in load_file(path).items():
        prefix, part = key.split(".", 1)
        if not prefix.startswith("lora_unet_") or prefix[len("lora_unet_"):] not in by_flat:
            sys.exit(f"{path}: key {key} names no UNet module")
        modules[by_flat[prefix[len("lora_unet_"):]]][part.removesuffix(".weight")] = tensor.float()
    return dict(modules)


def lokr_rank(m):
    """(r, scale) of a LoKr module: scale alpha/r with a low-rank factor, 1 with both full."""
    for low in ("lokr_w1_a", "lokr_w2_a"):
        if low in m:
            r = m[low].shape[1]
            return r, m["alpha"].item() / r
    return None, 1.0


def merged_weight(method, m, weight):
    """The plain-torch merged weight for one module, from the formulas (float64)."""
    w = weight.double()

    def flat(t):
        return t.double().flatten(1)

    if method == "loha":
        r = m["hada_w1_a"].shape[1]
        d = (flat(m["hada_w1_a"]) @ flat(m["hada_w1_b"])) * (flat(m["hada_w2_a"]) @ flat(m["hada_w2_b"]))
        return w + (d * m["alpha"].item() / r).reshape(w.shape)
    if method == "lokr":
        w1 = m["lokr_w1"].double() if "lokr_w1" in m else flat(m["lokr_w1_a"]) @ flat(m["lokr_w1_b"])
        w2 = m["lokr_w2"].double() if "lokr_w2" in m else flat(m["lokr_w2_a"]) @ flat(m["lokr_w2_b"])
        w2 = w2.reshape(w2.shape[0], -1, *w.shape[2:])
        kron = torch.kron(w1.reshape(*w1.shape, *[1] * (w.ndim - 2)), w2)  # [a·b, c·d(, kh, kw)]
        return w + (kron * lokr_rank(m)[1]).reshape(w.shape)
    if method == "dora":
        r = m["lora_down"].shape[0]
        v = w + (flat(m["lora_up"]) @ flat(m["lora_down"]) * m["alpha"].item() / r).reshape(w.shape)
        cols = w.shape[1]
        norm = v.transpose(0, 1).reshape(cols, -1).norm(dim=1).reshape(1, cols, *[1] * (w.ndim - 2))
        merged = v * m["dora_scale"].double().reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps)
        return w + 1.0 * (merged - w)
    raise ValueError(method)


def torch_merge(pipe, method, path):
    unet = pipe.unet
    with torch.no_grad():
        for name, m in modules_of(path, unet).items():
            layer = unet.get_submodule(name)
            layer.weight.copy_(merged_weight(method, m, layer.weight).float())


def peft_adapt(pipe, method, path):
    """Injects PEFT's LoHa/LoKr modules at the file's modules and copies the file's tensors in."""
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model

    modules = modules_of(path, pipe.unet)
    ranks, alphas = {}, {}
    for name, m in modules.items():
        if method == "loha":
            ranks[name], alphas[name] = m["hada_w1_a"].shape[1], m["alpha"].item()
        else:
            if "lokr_w1_a" in m:
                raise ValueError("a decomposed lokr_w1 needs decompose_both=True")
            r, _ = lokr_rank(m)
            if r is None:  # both full: any r ≥ max(b, d)/2 keeps w2 full; alpha = r gives scale 1
                r = (max(m["lokr_w2"].shape[:2]) + 1) // 2
                alphas[name] = float(r)
            else:
                alphas[name] = m["alpha"].item()
            ranks[name] = r
    common = dict(target_modules=list(modules), r=4, alpha=4, rank_pattern=ranks, alpha_pattern=alphas)
    config = (LoHaConfig(**common) if method == "loha"
              else LoKrConfig(decompose_both=False, decompose_factor=-1, **common))
    inject_adapter_in_model(config, pipe.unet)
    params = dict(pipe.unet.named_parameters())
    with torch.no_grad():
        for name, m in modules.items():
            for part, tensor in m.items():
                if part == "alpha":
                    continue
                key = f"{name}.{part}.default"
                if key not in params:
                    raise KeyError(f"PEFT has no parameter {key}")
                p = params[key]
                if p.numel() != tensor.numel() or p.shape[0] != tensor.shape[0]:
                    raise ValueError(f"{key}: PEFT {tuple(p.shape)}, file {tuple(tensor.shape)}")
                p.copy_(tensor.reshape(p.shape))
            layer = pipe.unet.get_submodule(name)
            held = {n for n in layer.adapter_layer_names if "default" in getattr(layer, n)}
            if held != set(m) - {"alpha"}:
                raise ValueError(f"{name}: PEFT holds {sorted(held)}, the file {sorted(m)}")
            if method == "lokr" and abs(layer.scaling["default"] - lokr_rank(m)[1]) > 1e-7:
                raise ValueError(f"{name}: PEFT scaling {layer.scaling['default']}, file {lokr_rank(m)[1]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tests/fixtures/tiny-sd", help="a complete diffusers folder")
    ap.add_argument("--sdpipe", default="target/release/sdpipe", help="the sdpipe binary")
    ap.add_argument("--images", default="datasets/toy-shapes", help="training images")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--keep", action="store_true", help="keep the temporary project")
    ap.add_argument("--rank", type=int, default=4, help="adapter rank (2 makes LoKr's w2 low-rank on the tiny model)")
    ap.add_argument("--targets", default="", help="comma-separated lora.targets, e.g. to_q,to_k,to_v,to_out.0,conv1,conv2 (default: each method's own)")
    args = ap.parse_args()

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    model, sdpipe = os.path.abspath(args.model), os.path.abspath(args.sdpipe)
    work = tempfile.mkdtemp(prefix="sdpipe-adapters-")
    shutil.copytree(args.images, os.path.join(work, "images"))
    with open(os.path.join(work, "p.toml"), "w") as f:
        f.write(PIPELINE.format(
            model=model,
            rank=args.rank,
            targets=f"targets = {json.dumps(args.targets.split(','))}" if args.targets else "",
        ))
    print(f"training in {work} ...", flush=True)
    run([sdpipe, "run", "p.toml"], cwd=work)
    out = os.path.join(work, "outputs", "cmp")
    files = {m: os.path.join(out, f"train@method={m}", "lora.safetensors") for m in METHODS}
    for path in files.values():
        if not os.path.exists(path):
            sys.exit(f"missing training output {path}")

    generator = torch.Generator().manual_seed(0)
    vae_cfg = json.load(open(os.path.join(model, "vae", "config.json")))
    unet_cfg = json.load(open(os.path.join(model, "unet", "config.json")))
    side = 16
    latent = side // 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    latents = torch.randn((1, unet_cfg["in_channels"], latent, latent), generator=generator)
    latents_file = os.path.join(work, "latents.safetensors")
    save_file({"latents": latents.contiguous()}, latents_file)
    prompt = "a photo of zorb"

    def reference_image(pipe):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(prompt, negative_prompt="", num_inference_steps=args.steps, guidance_scale=args.cfg,
                        latents=latents.clone(), height=side, width=side, output_type="pt").images.float()

    def sdpipe_image(name, extra):
        tensor = os.path.join(work, f"{name}.safetensors")
        run([sdpipe, "sample", "--model", model, "--prompt", prompt, "--negative", "",
             "--steps", str(args.steps), "--sampler", "ddim", "--cfg", str(args.cfg),
             "--width", str(side), "--height", str(side), "--init-latents", latents_file,
             "--out", os.path.join(work, f"{name}.png"), "--out-tensor", tensor] + extra, cwd=work)
        return load_file(tensor)["image"].float()

    def base_pipe():
        return StableDiffusionPipeline.from_pretrained(model, safety_checker=None, local_files_only=True)

    # rows: (artifact, what load_lora_weights did, reference, reference image or None, sdpipe image)
    rows, notes = [], []
    rows.append(("base model", "-", "from_pretrained", reference_image(base_pipe()), sdpipe_image("base", [])))

    for method in METHODS:
        ours = sdpipe_image(method, ["--lora", f"{files[method]}:1.0"])
        pipe = base_pipe()
        with captured_warnings() as log:
            try:
                pipe.load_lora_weights(files[method])
                pipe.fuse_lora(lora_scale=1.0)
                outcome = "loads"
            except Exception as e:  # noqa: BLE001 - what diffusers raises is the finding
                outcome = f"raises {type(e).__name__}: {e}"
        notes.append((method, outcome, log))
        noise = [w for w in log if any(s in w.lower() for s in SKIPPED_KEYS)]
        first = lambda text: re.split(r":\s*\n|\. ", text)[0]  # noqa: E731 - a message's first clause
        verdict = short(first(outcome) if outcome != "loads" else "loads" + (f", warns: {first(noise[0])}" if noise else ""), 72)
        if method == "locon":
            # Every module of the file must have been fused, and nothing warned about keys.
            base_unet = base_pipe().unet
            modules = modules_of(files[method], base_unet)
            fused = sum(not torch.equal(pipe.unet.get_submodule(n).weight, base_unet.get_submodule(n).weight)
                        for n in modules)
            ok = outcome == "loads" and not noise and fused == len(modules)
            how = f"load_lora_weights + fuse_lora ({fused}/{len(modules)} fused)"
            rows.append((method, verdict, how, reference_image(pipe) if ok else None, ours))
            continue
        if method == "dora":
            pipe = base_pipe()
            torch_merge(pipe, method, files[method])
            rows.append((method, verdict, "torch merge, per-input-column norm", reference_image(pipe), ours))
            continue
        pipe = base_pipe()
        try:
            peft_adapt(pipe, method, files[method])
            how = f"peft {dict(loha='LoHa', lokr='LoKr')[method]}Config"
            rows.append((method, verdict, how, reference_image(pipe), ours))
        except Exception as e:  # noqa: BLE001
            notes.append((method, f"PEFT reference failed: {type(e).__name__}: {e}", []))
            pipe = base_pipe()
            torch_merge(pipe, method, files[method])
            rows.append((method, verdict, "torch merge (PEFT failed)", reference_image(pipe), ours))

    print("\nwhat diffusers' load_lora_weights does with each file (and any PEFT failure):")
    for method, outcome, messages in notes:
        print(f"  {method:6} {short(outcome, 160)}")
        for message in messages:
            print(f"         warning: {short(message)}")

    base = rows[0][4]
    failed = False
    print(f"\n{'artifact':10} {'diffusers load_lora_weights':72} {'reference (how loaded)':44} "
          f"{'max |ref - sdpipe|':>19} {'changes the image by':>21}")
    for name, verdict, how, reference, ours in rows:
        diff = float("inf") if reference is None else (reference - ours).abs().max().item()
        effect = (ours - base).abs().max().item()
        ok = diff <= TOLERANCE and (name == "base model" or effect > 10 * TOLERANCE)
        failed |= not ok
        print(f"{name:10} {verdict:72} {how:44} {diff:19.2e} {effect:21.3f}  {'ok' if ok else 'FAIL'}")
    if args.keep:
        print(f"\nkept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
