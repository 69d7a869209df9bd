#!/usr/bin/env bash
# Runs `sdpipe bench` and the diffusers reference (bench/reference/ref_bench.py) on the same
# shapes, on the same machine, one after the other, and writes a markdown ratio table.
#
# Usage (on the GPU machine, from the repository root):
#   scripts/bench-side-by-side.sh [OUT_DIR]
#
# Environment:
#   SDPIPE        the sdpipe binary (default target/release/sdpipe, built with --features cuda)
#   REF_BENCH     ref_bench.py (default ../shared/bench/reference/ref_bench.py)
#   PYTHON        a Python with torch, diffusers and peft (default python3)
#   SDPIPE_ARGS   extra arguments for every `sdpipe bench` (default "--device cuda:0")
#   PRECISION     what sdpipe's UNet computes in for the UNet tasks (default f16, mixed
#                 precision, the counterpart of the reference's bf16 autocast; f32 also works)
#   SECTIONS      ref_bench.py sections (default: unet_lora_train unet_full_train inference
#                 text_encoder_ti)
#
# Writes OUT_DIR/ref_bench.log, OUT_DIR/ref_bench.json (ref_bench.py's own), OUT_DIR/sdpipe.jsonl
# (one `sdpipe bench --json` object per line) and OUT_DIR/side-by-side.md (the table to paste
# into docs/benchmarks.md). Shapes are ref_bench.py's (fixed there): SD 1.5 at 512 px; LoRA r16
# at batch 1/4/8, full UNet at batch 1/4, textual inversion at batch 4, one CFG step at batch 1
# (the UNet on 2), VAE encode of 8 images; ratios are sdpipe / reference (> 1: sdpipe faster or,
# for memory, larger).
set -euo pipefail

OUT_DIR=${1:-${OUT:-bench-out}}
SDPIPE=${SDPIPE:-target/release/sdpipe}
REF_BENCH=${REF_BENCH:-../shared/bench/reference/ref_bench.py}
PYTHON=${PYTHON:-python3}
SDPIPE_ARGS=${SDPIPE_ARGS---device cuda:0}
SECTIONS=${SECTIONS:-unet_lora_train unet_full_train inference text_encoder_ti}
PRECISION=${PRECISION:-f16}
mkdir -p "$OUT_DIR"

# The reference first: it writes $OUT/ref_bench.json itself.
# shellcheck disable=SC2086
OUT="$OUT_DIR" "$PYTHON" "$REF_BENCH" $SECTIONS 2>&1 | tee "$OUT_DIR/ref_bench.log"

# sdpipe on the same shapes, with ref_bench.py's warm-up / iteration counts.
: > "$OUT_DIR/sdpipe.jsonl"
bench() {
    # shellcheck disable=SC2086
    "$SDPIPE" --quiet bench --arch sd15 --resolution 512 --json $SDPIPE_ARGS "$@" \
        | tee -a "$OUT_DIR/sdpipe.jsonl"
}
P=(--precision "$PRECISION")
for b in 1 4 8; do bench --task lora-train --rank 16 --batch "$b" --warmup 3 --iters 10 "${P[@]}"; done
for b in 1 4; do bench --task full-train --batch "$b" --warmup 2 --iters 6 "${P[@]}"; done
bench --task ti-train --batch 4 --warmup 2 --iters 6 "${P[@]}"
bench --task sample-step --batch 1 --warmup 3 --iters 10 "${P[@]}"
# the VAE computes in f32
bench --task vae-encode --batch 8 --warmup 2 --iters 5

"$PYTHON" - "$OUT_DIR" "$SDPIPE" <<'EOF'
import datetime, json, os, subprocess, sys

out, sdpipe = sys.argv[1], sys.argv[2]
ref = {k: (v, u, n) for k, v, u, n in json.load(open(os.path.join(out, "ref_bench.json")))}
ours = [json.loads(l) for l in open(os.path.join(out, "sdpipe.jsonl")) if l.strip()]
# sdpipe's key -> the reference's (the reference names its inference figures by precision)
alias = {"unet_cfg_step_bs1": "unet_cfg_step_bf16", "vae_encode_512_bs8": "vae_encode_512_bf16"}
head = [l for l in open(os.path.join(out, "ref_bench.log")) if l.startswith(("torch", "diffusers"))]
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
except OSError:
    gpu = "unknown GPU"
version = (subprocess.run([sdpipe, "--version"], capture_output=True, text=True).stdout.strip().splitlines() or ["sdpipe"])[0]
lines = [
    f"Measured {datetime.date.today()} on {gpu}; {version}; reference: "
    + "; ".join(h.strip() for h in head) + ".",
    "",
    "| figure (sdpipe precision) | sdpipe | reference | ratio | sdpipe peak GiB | reference peak GiB | memory ratio |",
    "|---|---|---|---|---|---|---|",
]
for o in ours:
    key = alias.get(o["key"], o["key"])
    r = ref.get(key)
    rv = f"{r[0]:.4g} {r[1]}" if r else "—"
    ratio = f"{o['value'] / r[0]:.2f}×" if r and r[0] > 0 else "—"
    rm = ref.get(key + "_peakmem")
    om = o.get("peakmem_gib")
    mem_ratio = f"{om / rm[0]:.2f}×" if rm and om and rm[0] > 0 else "—"
    om_text = f"{om:.2f}" if om is not None else "—"
    rm_text = f"{rm[0]:.2f}" if rm else "—"
    lines.append(f"| {key} ({o['precision']}) | {o['value']:.4g} {o['unit']} | {rv} | {ratio} | "
                 f"{om_text} | {rm_text} | {mem_ratio} |")
text = "\n".join(lines) + "\n"
open(os.path.join(out, "side-by-side.md"), "w").write(text)
print(text)
EOF
