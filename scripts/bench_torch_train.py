#!/usr/bin/env python3
"""PyTorch eager + timm training throughput of ghostnetv3_100 on the GPU, to set next to the
CUDA engine (scripts/gpu-check.sh runs both).

One training step = forward of the train form (re-parameterization branches, train-mode BN,
no dropout), cross-entropy with label smoothing 0.1, backward, timm's Lamb step (the paper's
optimizer) and an EMA update of all weights (torch._foreach_lerp_), at 224x224, batch 256, fp32,
random weights and random input (no download). TF32 is OFF by default (a fair fp32 baseline:
the engine computes in full fp32); --tf32 turns it on for cuDNN and matmuls. The deploy form
(timm.utils.model.reparameterize_model) is timed for the same step as the lower bound the fused
rep_conv aims at.

Each case: --warmup untimed steps, then --steps timed steps (CUDA synchronized); prints
images/s and ms/step. Usage: python3 scripts/bench_torch_train.py [--batch 256] [--steps 10]
"""

import argparse
import copy
import time

import torch
import torch.nn.functional as F
import timm
from timm.optim import Lamb
from timm.utils.model import reparameterize_model


def bench(model, batch, size, steps, warmup, channels_last):
    dev = torch.device("cuda")
    model = model.to(dev).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = Lamb(model.parameters(), lr=5e-3, weight_decay=0.05)
    ema = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=dev, generator=g).to(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=dev, generator=g)

    def step():
        out = model(x)
        loss = F.cross_entropy(out, y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1e-4)
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    assert torch.isfinite(loss).item(), "loss is not finite"
    return dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ghostnetv3_100")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--no-deploy", action="store_true", help="skip the deploy-form case")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False)")
        return
    torch.backends.cudnn.allow_tf32 = a.tf32
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    train = timm.create_model(a.model, num_classes=1000, drop_rate=0.0)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.cuda.get_device_name()}, "
          f"tf32={a.tf32}, batch {a.batch}, {a.size}x{a.size}")
    cases = [("train form", train, False), ("train form channels_last", train, True)]
    if not a.no_deploy:
        deploy = reparameterize_model(copy.deepcopy(train).eval())
        cases.append(("deploy form", deploy, False))
    for name, m, cl in cases:
        dt = bench(copy.deepcopy(m), a.batch, a.size, a.steps, a.warmup, cl)
        print(f"torch eager {a.model} {name:<26} {a.batch / dt:9.1f} images/s  {dt * 1e3:8.1f} ms/step")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
