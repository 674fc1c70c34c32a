#!/usr/bin/env python3
"""PyTorch/timm reference timings for ghostnetv3_100 on the CPU, to compare with
`cargo bench --bench forward`.

Cases (224x224, 1000 classes, fp32, random weights, seeded random input):
  * eval forward under torch.no_grad, batch 1 and 8, train form (re-parameterization
    branches) and deploy form (timm.utils.model.reparameterize_model), NCHW and channels_last;
  * one train step of the train form at batch 8 (forward in train mode without dropout,
    cross entropy, backward), NCHW and channels_last.

Each case: `--warmup` untimed runs, then the median of `--runs` timed runs.
Threads: torch's default (the number of cores) unless --threads is given. On a machine shared
with other busy processes, OpenMP's default active spin-waiting can make torch many times
slower; `OMP_WAIT_POLICY=PASSIVE` in the environment (read when torch loads) avoids that. The
header line says which policy was in force.

Needs: pip install torch timm  (CPU is enough; no weights are downloaded).
Usage: python3 scripts/bench_torch_forward.py [--runs 20] [--warmup 3] [--threads N]
"""

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
import timm
from timm.utils.model import reparameterize_model

MODEL = "ghostnetv3_100"
CLASSES = 1000
SIZE = 224


def median_ms(fn, runs, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    train_form = timm.create_model(MODEL, pretrained=False, num_classes=CLASSES, drop_rate=0.0)
    train_form.eval()
    deploy_form = reparameterize_model(train_form, inplace=False).eval()
    gen = torch.Generator().manual_seed(42)
    inputs = {n: torch.randn(n, 3, SIZE, SIZE, generator=gen) for n in (1, 8)}
    labels = torch.randint(0, CLASSES, (8,), generator=gen)

    print(
        f"torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}, "
        f"{MODEL} {SIZE}x{SIZE}, {CLASSES} classes, fp32, median of {args.runs} runs "
        f"after {args.warmup} warm-up"
    )
    rows = []

    for layout in ("nchw", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        forms = {"train_form": train_form, "deploy_form": deploy_form}
        for m in forms.values():
            m.to(memory_format=fmt).eval()
        for n, x0 in inputs.items():
            x = x0.contiguous(memory_format=fmt)
            ms = {}
            for form, m in forms.items():
                with torch.no_grad():
                    ms[form] = median_ms(lambda: m(x), args.runs, args.warmup)
                rows.append((f"eval forward b{n}", form, layout, n, ms[form]))
            rows.append(
                (f"eval forward b{n}", "ratio deploy/train", layout, None,
                 ms["deploy_form"] / ms["train_form"])
            )

        # One train step of the train form at batch 8. BN running stats drift over the
        # runs; that changes no timing. Gradients are dropped between steps.
        m = train_form
        m.train()
        x = inputs[8].contiguous(memory_format=fmt)

        def step():
            m.zero_grad(set_to_none=True)
            loss = F.cross_entropy(m(x), labels)
            loss.backward()

        rows.append(("train step b8", "train_form", layout, 8,
                     median_ms(step, args.runs, args.warmup)))
        m.zero_grad(set_to_none=True)
        m.eval()

    print(f"{'case':<18} {'form':<19} {'layout':<14} {'ms/batch':>10} {'images/s':>10}")
    for case, form, layout, n, v in rows:
        if n is None:
            print(f"{case:<18} {form:<19} {layout:<14} {v:>10.2f}")
        else:
            print(f"{case:<18} {form:<19} {layout:<14} {v:>10.1f} {n * 1e3 / v:>10.1f}")


if __name__ == "__main__":
    main()
