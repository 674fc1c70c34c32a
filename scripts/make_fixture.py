#!/usr/bin/env python3
"""Small reference fixtures for ghostv3's other models (timm, or torchvision for ShuffleNetV2).

Extends ../shared/tools/make_fixture.py so fixtures can be committed (a few hundred KB each even
for ResNet-101): every parameter, BN buffer and the input come from a counter-based generator that
tests/fixture_models.rs re-implements, so the weights are not stored. For tensor NAME, element i:

    key = splitmix64(fnv1a64(NAME) ^ seed);  u = (splitmix64(key ^ i) >> 11) * 2^-53   in [0, 1)

    BN weight U[0.5, 1.5), BN bias 0.2 (2u - 1), running_mean 0.1 (2u - 1), running_var U[0.5, 1.5)
    any other weight or bias U(-b, b), b = 1 / sqrt(fan_in)   (PyTorch's default bound; a larger
    one, He's, makes eval-mode activations grow through the depth until float32 eval logits of
    GhostNetV2 differ from float64 by 30-80%)
    input [B, 3, S, S] U(-2, 2)       (values computed in float64, rounded to float32)

OUT/reference.safetensors holds:
  labels [B] i64; logits (eval mode, f32), logits_f64 (eval, float64);
  train_logits, train_loss (one train-mode forward: BN on batch statistics, dropout off, mean CE,
  float64); for every parameter of that step's float64 gradient: gnorm.<p> (L2 norm), gmax.<p>
  (max abs), gidx.<p> (sampled flat indices: the first 16 and 48 evenly spaced) and gval.<p>.
OUT/meta.json: model, source, classes, size, batch, seed, versions, the state-dict names and
shapes, params and MACs (convs + linear) of the 1000-class model at 224, and the f32-vs-f64 spread.

Needs: pip install torch torchvision timm safetensors numpy   (CPU is enough)
Run:   python3 scripts/make_fixture.py --model resnet18 --out tests/fixtures/resnet18-64
"""
import argparse
import copy
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

M64 = (1 << 64) - 1


def splitmix64(z):
    """splitmix64 on a numpy uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def fnv1a64(s):
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def uniform(name, n, seed):
    key = splitmix64(np.array([fnv1a64(name) ^ seed], dtype=np.uint64))
    z = splitmix64(key ^ np.arange(n, dtype=np.uint64))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def value(name, shape, sd, seed):
    """The generated value of state-dict entry `name` (float64)."""
    n = int(np.prod(shape)) if len(shape) else 1
    u = uniform(name, n, seed)
    prefix, leaf = name.rsplit(".", 1) if "." in name else ("", name)
    is_bn = f"{prefix}.running_mean" in sd
    if leaf == "running_mean":
        v = 0.1 * (2 * u - 1)
    elif leaf == "running_var":
        v = 0.5 + u
    elif is_bn and leaf == "weight":
        v = 0.5 + u
    elif is_bn and leaf == "bias":
        v = 0.2 * (2 * u - 1)
    elif leaf == "weight":
        fan_in = int(np.prod(shape[1:]))
        v = (2 * u - 1) / math.sqrt(fan_in)
    elif leaf == "bias":
        fan_in = int(np.prod(sd[f"{prefix}.weight"].shape[1:]))
        v = (2 * u - 1) / math.sqrt(fan_in)
    else:
        raise ValueError(f"no rule for {name}")
    return v.reshape(shape)


def create(name, classes):
    if name.startswith("shufflenet_v2"):
        import torchvision
        return getattr(torchvision.models, name)(weights=None, num_classes=classes), "torchvision"
    import timm
    return timm.create_model(name, pretrained=False, num_classes=classes), "timm"


def fill(model, seed):
    sd = model.state_dict()
    with torch.no_grad():
        for k, t in sd.items():
            if k.endswith("num_batches_tracked"):
                t.fill_(100)
                continue
            t.copy_(torch.from_numpy(value(k, tuple(t.shape), sd, seed).astype(np.float32)))


def macs_at(model, size):
    """Multiply-adds of convs and linear layers (what `ghostv3 info` counts)."""
    total = [0]

    def conv_hook(m, inp, out):
        total[0] += out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def lin_hook(m, inp, out):
        total[0] += m.in_features * m.out_features

    hs = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hs.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.Linear):
            hs.append(m.register_forward_hook(lin_hook))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in hs:
        h.remove()
    return total[0]


def train_step(model, x, y):
    m = copy.deepcopy(model).train()
    if hasattr(m, "drop_rate"):
        m.drop_rate = 0.0
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    out = m(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    return out.detach(), loss.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tries", type=int, default=10)
    ap.add_argument("--max-spread", type=float, default=1e-4)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(a.seed)

    full, source = create(a.model, 1000)
    params_1000 = sum(p.numel() for p in full.parameters())
    macs_224 = macs_at(full, 224)
    del full

    # Some draws are ill-conditioned in float32 (PyTorch's own float32 gradients differ from float64
    # by up to 1e-1 of the tolerance measure: seen for ResNet-50/101 and MobileNetV2 in train mode);
    # such a draw says nothing about the engine, so try the next seed. If none is good enough the
    # best one is kept and meta.json says the gradients are not a reliable reference.
    best, tried = None, []
    for seed in list(range(a.seed, a.seed + a.tries)) + [None]:
        if seed is None:
            seed = best[1]
        model, _ = create(a.model, a.classes)
        model.eval()
        fill(model, seed)
        x = torch.from_numpy((4 * uniform("input", a.batch * 3 * a.size * a.size, seed) - 2)
                             .astype(np.float32).reshape(a.batch, 3, a.size, a.size))
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, a.classes, (a.batch,), generator=g)
        tl32, tloss32, g32 = train_step(model, x, y)
        tl64, tloss64, g64 = train_step(copy.deepcopy(model).double(), x.double(), y)
        big = max(t.abs().max().item() for t in g64.values())
        spread = max((g32[n].double() - t).abs().max().item() / (t.abs().max().item() + 1e-3 * big)
                     for n, t in g64.items())
        print(f"seed {seed}: float32 vs float64 gradient spread {spread:.2e}")
        if len(tried) < a.tries:
            tried.append(spread)
        if spread <= a.max_spread or (best is not None and seed == best[1] and spread == best[0]):
            break
        if best is None or spread < best[0]:
            best = (spread, seed)
    a.seed = seed
    grads_reliable = spread <= a.max_spread
    with torch.no_grad():
        logits = model(x)
        logits64 = copy.deepcopy(model).double()(x.double())

    ref = {"labels": y, "logits": logits, "logits_f64": logits64.float(),
           "train_logits": tl64.float(), "train_loss": tloss64.reshape(1).float()}
    for n, t in g64.items():
        flat = t.flatten()
        k = flat.numel()
        idx = sorted(set(list(range(min(16, k))) + [int(i) for i in np.linspace(0, k - 1, 48)]))
        idx_t = torch.tensor(idx, dtype=torch.int64)
        gmax = flat.abs().max().item()
        ref[f"gnorm.{n}"] = flat.norm().reshape(1).float()
        ref[f"gmax.{n}"] = torch.tensor([gmax], dtype=torch.float32)
        ref[f"gidx.{n}"] = idx_t
        ref[f"gval.{n}"] = flat[idx_t].float()
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(a.out, "reference.safetensors"))

    def rel(a32, a64):
        return (a32.double() - a64).abs().max().item() / max(a64.abs().max().item(), 1e-30)

    logit_scale = logits64.abs().max().item()
    bias = dict(model.named_parameters()).get("fc.bias", dict(model.named_parameters()).get("classifier.bias"))
    meta = {
        "model": a.model, "source": source, "classes": a.classes, "size": a.size, "batch": a.batch,
        "seed": a.seed, "torch": torch.__version__,
        "generator": "splitmix64(splitmix64(fnv1a64(name) ^ seed) ^ i) >> 11, * 2^-53; see the docstring",
        "params_1000": params_1000, "macs_224": macs_224,
        "state": [[k, list(v.shape)] for k, v in model.state_dict().items()],
        "rel_err_logits_f32_vs_f64": rel(logits, logits64),
        "max_abs_logit": logit_scale,
        "max_abs_classifier_bias": bias.abs().max().item(),
        "train_loss_f32": tloss32.item(), "train_loss_f64": tloss64.item(),
        "rel_err_train_logits_f32_vs_f64": rel(tl32, tl64),
        "grad_check": "max|g - g_ref| / (max|g_ref| + 1e-3 * G), G = largest gradient magnitude in the model",
        "largest_gradient_G": big,
        "worst_grad_err_f32_vs_f64": spread,
        "grads_reliable": grads_reliable,
        "spreads_tried": tried,
    }
    with open(os.path.join(a.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=0)
    print(json.dumps({k: v for k, v in meta.items() if k != "state"}, indent=1))


if __name__ == "__main__":
    main()
