#!/usr/bin/env python3
"""PyTorch eager + timm: the bytes and ops of one training step, counted the way
`ghostv3 bench --train --device cuda --profile` counts ours, so both stand in one table.

One step = forward (train mode), cross-entropy with label smoothing 0.1, backward, timm's Lamb
and an EMA of every weight (torch._foreach_lerp_), as scripts/bench_torch_train_cpu.py times it.
Under a TorchDispatchMode every aten op is recorded with the bytes of its tensor inputs and
outputs (what a kernel of it reads and writes; view ops move nothing and count 0 bytes, but are
counted as ops). Counted at batches 2, 3 and 4 on the CPU and fitted per image and per step
(checked at the third batch), then evaluated at --batch. Phases: forward, backward, update.

Usage:
  python3 scripts/count_torch_step.py --model ghostnetv3_100 --form train --size 224 --batch 256 \
      [--ours ours.json] [--json torch.json]
--ours prints our counts (`ghostv3 bench ... --json ours.json`) beside PyTorch's.
"""

import argparse
import copy
import json

import torch
import torch.nn.functional as F
import timm
from timm.optim import Lamb
from timm.utils.model import reparameterize_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Named GPUs as train::traffic::GPUS: DRAM GB/s, fp32 TFLOP/s; and its LAUNCH_US.
GPUS = [("V100", 900.0, 15.7), ("A100", 2039.0, 19.5), ("H100", 3350.0, 67.0), ("H200", 4800.0, 67.0)]
LAUNCH_US = 2.0

# Ops that only make views or metadata: no kernel, no bytes.
VIEW_OPS = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "as_strided",
    "detach", "alias", "squeeze", "unsqueeze", "select", "slice", "split", "split_with_sizes",
    "unbind", "chunk", "narrow", "empty", "empty_like", "empty_strided", "new_empty",
    "new_empty_strided", "_reshape_alias", "lift_fresh", "unfold", "view_as", "_to_copy_noop",
    "is_same_size", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel",
}


def family(op, args, phase):
    """The op family, named as train::traffic::family names ours."""
    if phase == "update":
        return "optimizer"
    if op in ("convolution", "convolution_backward"):
        # convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding,
        # groups); convolution_backward(grad_output, input, weight, bias_sizes, ..., groups, mask)
        groups, w = (args[8], args[1]) if op == "convolution" else (args[9], args[2])
        if groups > 1 and isinstance(w, torch.Tensor) and w.shape[1] == 1:
            return "conv depth-wise"
        return "conv/linear GEMM"
    if op in ("mm", "addmm", "bmm", "linear"):
        return "conv/linear GEMM"
    if "batch_norm" in op:
        return "batch_norm"
    if op.split("_backward")[0].rstrip("_") in (
        "relu", "threshold", "hardsigmoid", "sigmoid", "hardtanh", "hardswish", "gelu", "silu"
    ):
        return "activation"
    if any(k in op for k in ("pool", "upsample")) or op == "mean":
        return "pooling/upsample"
    if any(k in op for k in ("softmax", "nll_loss", "cross_entropy")):
        return "loss"
    if op in ("cat", "slice_backward", "copy_", "clone", "fill_", "zero_", "zeros", "zeros_like",
              "ones_like", "full", "new_zeros", "select_backward", "_to_copy", "stack"):
        return "copy/cat/fill"
    return "elementwise"


def nbytes(tree):
    flat, _ = tree_flatten(tree)
    return sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))


def flops(op, args, out):
    """FLOPs of the convs and matrix products (the rest is memory-bound and counts 0, as ours)."""
    if op == "convolution":
        w = args[1]
        return 2 * out.numel() * w.shape[1] * w.shape[2] * w.shape[3]
    if op == "convolution_backward":
        gy, w, mask = args[0], args[2], args[10]
        per = 2 * gy.numel() * w.shape[1] * w.shape[2] * w.shape[3]
        return per * (int(mask[0]) + int(mask[1]))
    if op in ("mm", "addmm", "bmm"):
        a, b = (args[1], args[2]) if op == "addmm" else (args[0], args[1])
        return 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if op == "bmm" else 1)
    return 0


class Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.rows = []  # (phase, family, op, bytes, flops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        op = func.overloadpacket.__name__
        view = op.rstrip("_") in VIEW_OPS
        b = 0 if view else nbytes((args, kwargs)) + nbytes(out)
        self.rows.append((self.phase, family(op, args, self.phase), op, b, flops(op, args, out), view))
        return out


def count(a, batch):
    torch.manual_seed(0)
    model = timm.create_model(a.model, num_classes=a.classes, drop_rate=0.0)
    if a.form == "deploy":
        model = reparameterize_model(copy.deepcopy(model).eval())
    model.train()
    opt = Lamb(model.parameters(), lr=0.02, weight_decay=0.05)
    ema = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(batch, 3, a.size, a.size)
    y = torch.arange(batch) % a.classes

    def step(c):
        if c:
            c.phase = "forward"
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        if c:
            c.phase = "backward"
        loss.backward()
        if c:
            c.phase = "update"
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1e-4)

    step(None)  # the optimizer's state exists from the second step on, as in training
    c = Counter()
    with c:
        step(c)
    return c.rows


def group(rows, key):
    out = {}
    for r in rows:
        k = key(r)
        ops, b = out.get(k, (0, 0))
        out[k] = (ops + 1, b + r[3])
    return out


def fit(b1, c1, b2, c2):
    per_image = (c2 - c1) / (b2 - b1)
    return per_image, c1 - b1 * per_image


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ghostnetv3_100")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--form", choices=["train", "deploy"], default="train")
    ap.add_argument("--batch", type=int, default=256, help="where the fitted counts are shown")
    ap.add_argument("--ours", help="our counts (ghostv3 bench --train --device cuda --profile --json)")
    ap.add_argument("--json", help="write PyTorch's counts here")
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    batches = (2, 3, 4)
    runs = [count(a, b) for b in batches]
    assert len({len(r) for r in runs}) == 1, "aten op counts differ between batches"
    res = {"model": a.model, "form": a.form, "size": a.size, "batches": batches,
           "ops": len(runs[2]), "kernel_ops": sum(1 for r in runs[2] if r[2].rstrip("_") not in VIEW_OPS)}
    worst = 0.0
    for name, key in (("families", lambda r: r[1]), ("phases", lambda r: r[0])):
        g = [group(r, key) for r in runs]
        rows = []
        for k in sorted(g[2]):
            pi, ps = fit(batches[0], g[0].get(k, (0, 0))[1], batches[1], g[1].get(k, (0, 0))[1])
            got = g[2][k][1]
            if got:
                worst = max(worst, abs(ps + batches[2] * pi - got) / got)
            rows.append({"name": k, "launches": g[2][k][0],
                         "bytes": {"per_image": pi, "per_step": ps}})
        res[name] = rows
    tot = [sum(r[3] for r in run) for run in runs]
    pi, ps = fit(batches[0], tot[0], batches[1], tot[1])
    res["bytes"] = {"per_image": pi, "per_step": ps}
    res["fit_error"] = worst
    ours = json.load(open(a.ours)) if a.ours else None
    print(f"{a.model} {a.form} form, {a.size}x{a.size}, one training step (Lamb + EMA); "
          f"bytes per image (MB), fitted at batches {batches} (PyTorch fit exact to {worst:.1e})")
    for table in ("families", "phases"):
        mine = {r["name"]: r for r in (ours[table] if ours else [])}
        theirs = {r["name"]: r for r in res[table]}
        print(f"{table[:-1] if table != 'families' else 'family':<22} {'torch ops':>9} {'torch MB/img':>12}"
              + (f" {'ours launches':>13} {'ours MB/img':>11} {'ours/torch':>10}" if ours else ""))
        for k in sorted(set(mine) | set(theirs), key=lambda k: -theirs.get(k, {"bytes": {"per_image": 0}})["bytes"]["per_image"]):
            t, o = theirs.get(k), mine.get(k)
            tb = t["bytes"]["per_image"] / 1e6 if t else 0.0
            line = f"{k:<22} {t['launches'] if t else 0:>9} {tb:>12.2f}"
            if ours:
                ob = o["bytes"]["per_image"] / 1e6 if o else 0.0
                ratio = f"{ob / tb:>10.2f}" if tb else f"{'-':>10}"
                line += f" {o['launches'] if o else 0:>13} {ob:>11.2f} {ratio}"
            print(line)
    B = a.batch
    # The roofline floor at batch B, op by op as train::traffic computes ours: each kernel (not
    # a view) at least LAUNCH_US, else its bytes at the bandwidth or its FLOPs at the fp32 peak.
    per_op = []
    for i, r in enumerate(runs[2]):
        if r[5]:
            continue
        bpi, bps = fit(batches[0], runs[0][i][3], batches[1], runs[1][i][3])
        fpi, fps = fit(batches[0], runs[0][i][4], batches[1], runs[1][i][4])
        per_op.append((bps + B * bpi, fps + B * fpi))
    for gpu, bw, tf in GPUS:
        ms = sum(max(b / (bw * 1e3), f / (tf * 1e6), LAUNCH_US) for b, f in per_op) / 1e3
        res.setdefault("roofline_ms", {})[gpu] = ms
    tb = res["bytes"]
    print(f"PyTorch: {tb['per_image'] / 1e6:.1f} MB/image + {tb['per_step'] / 1e6:.1f} MB/step = "
          f"{(tb['per_step'] + B * tb['per_image']) / 1e9:.1f} GB per step at batch {B}; "
          f"{res['ops']} aten ops per step ({res['kernel_ops']} not views)")
    if ours:
        ob = ours["bytes"]
        print(f"ghostv3: {ob['per_image'] / 1e6:.1f} MB/image + {ob['per_step'] / 1e6:.1f} MB/step = "
              f"{(ob['per_step'] + B * ob['per_image']) / 1e9:.1f} GB per step at batch {B}; "
              f"{ours['launches']} launches per step")
    for gpu, bw, tf in GPUS:
        ms = res["roofline_ms"][gpu]
        print(f"roofline floor at batch {B} on {gpu} ({bw:.0f} GB/s): PyTorch {ms:.1f} ms/step "
              f"({B / ms * 1e3:.0f} images/s)")
    if ours:
        print(f"ours/torch: bytes per image {ob['per_image'] / tb['per_image']:.3f}, "
              f"launches/aten kernel ops {ours['launches'] / res['kernel_ops']:.3f}")

    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
