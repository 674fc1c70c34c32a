#!/usr/bin/env python3
"""ONNX Runtime side of ghostv3's checks (needs `pip install onnxruntime numpy`).

  ort_tool.py run MODEL.onnx IN.f32 OUT.f32 N C H W   run raw little-endian f32 NCHW input, write output
  ort_tool.py bench MODEL.onnx --batch B --size S [--threads 2] [--warmup 10] [--runs 50] [--min-secs 3]
      prints: median_ms=... p90_ms=... images_per_s=... runs=...

Sessions use ORT_ENABLE_ALL graph optimizations and the given intra-op threads (1 inter-op).
"""
import argparse
import sys
import time

import numpy as np
import onnxruntime as ort


def session(path, threads):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run(a):
    x = np.fromfile(a.inp, dtype="<f4").reshape(a.n, a.c, a.h, a.w)
    s = session(a.model, a.threads)
    (y,) = s.run(None, {s.get_inputs()[0].name: x})
    np.ascontiguousarray(y, dtype="<f4").tofile(a.out)


def bench(a):
    s = session(a.model, a.threads)
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, size=(a.batch, 3, a.size, a.size)).astype(np.float32)
    feed = {s.get_inputs()[0].name: x}
    for _ in range(a.warmup):
        s.run(None, feed)
    times = []
    t_start = time.perf_counter()
    while len(times) < a.runs or time.perf_counter() - t_start < a.min_secs:
        t0 = time.perf_counter()
        s.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    t = np.sort(np.array(times))
    med = float(t[int(round((len(t) - 1) * 0.5))])
    p90 = float(t[int(round((len(t) - 1) * 0.9))])
    print(f"median_ms={med:.3f} p90_ms={p90:.3f} images_per_s={a.batch / med * 1e3:.1f} runs={len(t)}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    for k in ["model", "inp", "out"]:
        r.add_argument(k)
    for k in ["n", "c", "h", "w"]:
        r.add_argument(k, type=int)
    r.add_argument("--threads", type=int, default=2)
    b = sub.add_parser("bench")
    b.add_argument("model")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--size", type=int, default=224)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--warmup", type=int, default=10)
    b.add_argument("--runs", type=int, default=50)
    b.add_argument("--min-secs", type=float, default=3.0)
    a = p.parse_args()
    {"run": run, "bench": bench}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
