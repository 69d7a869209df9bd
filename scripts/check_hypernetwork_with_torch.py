#!/usr/bin/env python3
"""Checks sdpipe's A1111 hypernetwork files and module against torch (not in CI: needs PyTorch).

    cargo run --release --example hypernetwork_dump -- target/hypernetwork-dump
    python3 scripts/check_hypernetwork_with_torch.py target/hypernetwork-dump

Loads every `.pt` with `torch.load` (`weights_only=True` and `False`), rebuilds A1111's
`HypernetworkModule` Sequential from the file's metadata (layer structure, activation, layer
norm, dropout), loads the state dicts strictly, and compares `x + mlp(x) * 0.7` with sdpipe's
output on the same inputs. Fails above 1e-5.
"""
import glob, os, inspect, json, struct, sys
import torch
import numpy as np

acts = {c.__name__.lower(): c for _, c in inspect.getmembers(torch.nn.modules.activation, inspect.isclass)
        if c.__module__ == 'torch.nn.modules.activation'}
acts.update({"linear": torch.nn.Identity, "swish": torch.nn.Hardswish})

def build(dim, sd, meta):
    ls = meta["layer_structure"]; act = meta["activation_func"]; ds = meta["dropout_structure"]
    layers = []
    for i in range(len(ls) - 1):
        layers.append(torch.nn.Linear(int(dim * ls[i]), int(dim * ls[i + 1])))
        if not (act == "linear" or act is None or (i >= len(ls) - 2 and not meta["activate_output"])):
            layers.append(acts[act]())
        if meta["is_layer_norm"]:
            layers.append(torch.nn.LayerNorm(int(dim * ls[i + 1])))
        if ds is not None and ds[i + 1] > 0:
            layers.append(torch.nn.Dropout(p=ds[i + 1]))
    seq = torch.nn.Sequential(*layers)
    seq.load_state_dict({k.removeprefix("linear."): v for k, v in sd.items()}, strict=True)
    seq.eval()
    return seq

def read_st(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n]); out = {}
    for k, v in h.items():
        if k == "__metadata__": continue
        s, e = v["data_offsets"]
        out[k] = torch.from_numpy(np.frombuffer(b[8 + n + s:8 + n + e], dtype=np.float32).reshape(v["shape"]).copy())
    return out

worst_all = 0.0
for pt in sorted(glob.glob(os.path.join(sys.argv[1] if len(sys.argv) > 1 else "target/hypernetwork-dump", "*.pt"))):
    d_safe = torch.load(pt, weights_only=True)
    d = torch.load(pt, weights_only=False)
    assert d_safe.keys() == d.keys()
    meta = {k: v for k, v in d.items() if not isinstance(k, int)}
    outs = read_st(pt.replace(".pt", ".out.safetensors"))
    worst = 0.0
    for dim in [k for k in d if isinstance(k, int)]:
        ksd, vsd = d[dim]
        for which, sd in (("k", ksd), ("v", vsd)):
            seq = build(dim, sd, meta)
            x = outs[f"{dim}.x"]
            with torch.no_grad():
                y = x + seq(x) * 0.7
            err = (y - outs[f"{dim}.{which}"]).abs().max().item()
            worst = max(worst, err)
    worst_all = max(worst_all, worst)
    print(f"{os.path.basename(pt):16s} keys={sorted(k for k in d if isinstance(k,int))} names={list(d[8][0].keys())} max|ours-torch|={worst:.2e}")
print("meta of last:", {k: v for k, v in meta.items()})
print("worst overall", worst_all)
sys.exit(0 if worst_all <= 1e-5 else 1)
