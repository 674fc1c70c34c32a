#!/usr/bin/env python3
"""PyTorch eager + timm: one training step on the CPU, the same step `ghostv3 bench --train`
times (scripts/bench_train_vs_torch.sh runs both in one go and prints the ratios).

One step = forward (train mode, no dropout), cross-entropy with label smoothing 0.1, backward,
timm's Lamb (lr 0.02, weight decay 0.05) and an EMA of every weight (torch._foreach_lerp_),
random weights and random input. --form train is timm's model as created (the re-parameterized
branches); --form deploy is timm.utils.model.reparameterize_model of it. Prints the median step,
images/s and the process's peak RSS (one case per process, so the peak is that case's).

Usage: python3 scripts/bench_torch_train_cpu.py --model ghostnetv3_050 --batch 8 --size 224 --form train
"""

import argparse
import copy
import resource
import statistics
import time

import torch
import torch.nn.functional as F
import timm
from timm.optim import Lamb
from timm.utils.model import reparameterize_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ghostnetv3_050")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--form", choices=["train", "deploy"], default="train")
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default (all cores)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--min-secs", type=float, default=3.0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = timm.create_model(a.model, num_classes=a.classes, drop_rate=0.0)
    if a.form == "deploy":
        model = reparameterize_model(copy.deepcopy(model).eval())
    model.train()
    opt = Lamb(model.parameters(), lr=0.02, weight_decay=0.05)
    ema = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 3, a.size, a.size, generator=g)
    y = torch.arange(a.batch) % a.classes

    def step():
        out = model(x)
        loss = F.cross_entropy(out, y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1e-4)
        assert torch.isfinite(loss).item(), "loss is not finite"

    for _ in range(a.warmup):
        step()
    times = []
    start = time.perf_counter()
    while len(times) < a.runs or time.perf_counter() - start < a.min_secs:
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    med = statistics.median(times)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KB -> MB
    print(f"torch {torch.__version__} eager {a.model} {a.form} form, training step (Lamb + EMA), "
          f"batch {a.batch}, {a.size}x{a.size}, {torch.get_num_threads()} threads: median {med:.1f} ms, "
          f"{a.batch * 1e3 / med:.1f} images/s ({len(times)} runs); peak RSS {rss:.1f} MB")


if __name__ == "__main__":
    main()
