#!/usr/bin/env python3
"""The hostile-user probe of issue 17, rerun against a built binary.

    python3 scripts/probe.py [target/release/ghostv3]

Each case feeds the binary one bad input (weights, checkpoints, recipes, signals, CLI misuse,
datasets) and classifies how it ended: ok / error (exit 1 with a message) / usage (exit 2) /
preempted (75) / PANIC (101) / ABORT (signal) / HANG (over the time limit), against what the case
expects. Prints a markdown table; exits 1 if any case panicked, aborted, hung or ended otherwise
than expected. Needs only the Python standard library.
"""

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/release/ghostv3")
WORK = tempfile.mkdtemp(prefix="ghostv3-probe-")
TINY = [
    "data.synthetic_train=64", "data.synthetic_val=32", "train.epochs=2", "schedule.epochs=2",
    "train.batch_size=32", "train.eval_batch_size=32", "model.rep_branches=2",
]
rows = []


def p(*parts):
    return os.path.join(WORK, *parts)


def sets(extra=()):
    out = []
    for s in list(TINY) + list(extra):
        out += ["--set", s]
    return out


def run(args, timeout=120, stdin=None, shell=False):
    t0 = time.time()
    try:
        r = subprocess.run(args if shell else [BIN] + args, capture_output=True, text=True,
                           timeout=timeout, cwd=WORK, shell=shell, stdin=stdin,
                           executable="/bin/bash" if shell else None)
        code = r.returncode
        err = (r.stderr or "").strip().splitlines()
        msg = err[-1] if err else ""
        run.full = (r.stdout or "") + (r.stderr or "")
    except subprocess.TimeoutExpired:
        code, msg = "HANG", f"over {timeout} s"
    return code, msg, time.time() - t0


def outcome(code):
    return {0: "ok", 1: "error", 2: "usage", 75: "preempted", 101: "PANIC", "HANG": "HANG"}.get(
        code, "ABORT" if isinstance(code, int) and code < 0 or code in (134, 137, 139) else
        f"exit {code}")


def case(name, args, expect="error", must=None, **kw):
    code, msg, secs = run(args, **kw)
    got = outcome(code)
    good = got == expect and (must is None or must in run.full)
    rows.append((name, expect, got, good, msg[:150], secs))
    return code, msg


def png(size, shade):
    """A size x size RGB PNG (standard library only)."""
    import zlib
    raw = b"".join(b"\x00" + bytes([shade, (shade * 3 + x) % 256, 255 - shade] * size)
                   for x in range(size))

    def chunk(kind, data):
        c = struct.pack(">I", len(data)) + kind + data
        return c + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def read_st(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), bytearray(b[8 + n:])


def write_st(path, header, data):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + bytes(data))


def set_f32(path, out, name, index, value, fix_checksum=False):
    """Writes `value` into element `index` of tensor `name` (data edited, header kept)."""
    h, d = read_st(path)
    off = h[name]["data_offsets"][0] + 4 * index
    d[off:off + 4] = struct.pack("<f", value)
    write_st(out, h, d)


def main():
    os.makedirs(p("runs"))
    # A base run to take files from.
    code, msg, _ = run(["train", "--out", p("base")] + sets())
    assert code == 0, msg
    best, ck = p("base", "best.safetensors"), p("base", "checkpoint.safetensors")
    h, _ = read_st(best)
    w0 = next(k for k in h if k.endswith("conv_stem.weight"))

    # 1. Weights and checkpoints.
    hh, dd = read_st(best)
    hh["classifier.weight"]["shape"] = []
    write_st(p("scalar_cls.safetensors"), hh, dd)
    case("classifier.weight of shape []", ["eval", "--model", "ghostnetv3_050", "--weights",
         p("scalar_cls.safetensors"), "--data", p("none"), "--size", "64"],
         must="classifier.weight")
    set_f32(best, p("huge_init.safetensors"), w0, 0, 3e38)
    case("model.init with a 3e38 weight",
         ["train", "--out", p("runs", "init")] + sets([f'model.init="{p("huge_init.safetensors")}"']))
    for what, name, value in [("a weight 1e30", w0, 1e30),
                              ("exp_avg_sq = -1", "optim.exp_avg_sq", -1.0)]:
        d = p("runs", "edit-" + name.replace(".", "_"))
        shutil.copytree(p("base"), d)
        os.remove(os.path.join(d, ".lock"))
        set_f32(ck, os.path.join(d, "checkpoint.safetensors"), name, 3, value)
        case(f"checkpoint edited: {what}", ["train", "--resume", d, "--set", "train.epochs=3"])
    d = p("runs", "flips")
    shutil.copytree(p("base"), d)
    hh, dd = read_st(ck)
    rng = random.Random(0)
    for _ in range(8):
        i = rng.randrange(len(dd))
        dd[i] ^= 1 << rng.randrange(8)
    write_st(os.path.join(d, "checkpoint.safetensors"), hh, dd)
    case("checkpoint with 8 flipped data bits", ["train", "--resume", d, "--set", "train.epochs=3"])
    d = p("runs", "epoch1000")
    shutil.copytree(p("base"), d)
    hh, dd = read_st(ck)
    hh["__metadata__"]["ghostv3.trainer"] = hh["__metadata__"]["ghostv3.trainer"].replace(
        '"epoch":2', '"epoch":1000')
    write_st(os.path.join(d, "checkpoint.safetensors"), hh, dd)
    case("checkpoint metadata epoch = 1000", ["train", "--resume", d])
    run(["train", "--out", p("other")] + sets(["train.epochs=1", "schedule.epochs=1"]))
    d = p("runs", "foreign")
    shutil.copytree(p("base"), d)
    shutil.copy(p("other", "checkpoint.safetensors"), os.path.join(d, "checkpoint.safetensors"))
    case("another run's checkpoint", ["train", "--resume", d, "--set", "train.epochs=3"])

    # 2. fold: a trained file folds; a broken one is refused before --out is touched.
    case("fold a trained file", ["fold", "--model", "ghostnetv3_050", "--branches", "2",
         "--weights", best, "--out", p("folded.safetensors")], expect="ok")
    open(p("keep.safetensors"), "wb").write(b"old output")
    hh, dd = read_st(best)
    rv = next(k for k in hh if k.endswith("running_var"))
    set_f32(best, p("negvar.safetensors"), rv, 0, -1.0)
    case("fold running_var = -1", ["fold", "--model", "ghostnetv3_050", "--branches", "2",
         "--weights", p("negvar.safetensors"), "--out", p("keep.safetensors")])
    rows[-1] = rows[-1][:3] + (rows[-1][3] and open(p("keep.safetensors"), "rb").read()
                               == b"old output",) + rows[-1][4:]

    # 3. Training that diverges: stopped naming the tensor, nothing non-finite written.
    # lr 10 may or may not diverge on this tiny set: either way nothing non-finite is written
    # (a NaN file would fail to fold: loading refuses it).
    code, _ = case("sgd lr=10, no warm-up", ["train", "--out", p("runs", "sgd10")] + sets(
        ["optimizer.kind=\"sgd\"", "train.lr=10", "schedule.warmup_epochs=0"]), expect="ok")
    if code == 1 and "became" in run.full:
        rows[-1] = rows[-1][:2] + ("error", True) + rows[-1][4:]
    for f in ["best", "last"]:
        path = p("runs", "sgd10", f + ".safetensors")
        if os.path.exists(path):
            case(f"  its {f}.safetensors folds (finite)", ["fold", "--model", "ghostnetv3_050",
                 "--branches", "2", "--weights", path, "--out", p(f"sgd10-{f}.safetensors")],
                 expect="ok")
    case("sgd lr=1e4, no warm-up", ["train", "--out", p("runs", "sgd1e4")] + sets(
        ["optimizer.kind=\"sgd\"", "train.lr=1e4", "schedule.warmup_epochs=0"]),
        must="became")
    case("adamw lr=1e4", ["train", "--out", p("runs", "adamw")] + sets(
        ["optimizer.kind=\"adamw\"", "train.lr=1e4"]), must="became")

    # 4. Signals and concurrent writers.
    args = [BIN, "train", "--out", p("runs", "term")] + sets(
        ["train.epochs=20", "schedule.epochs=20", 'train.checkpoint_every="1 steps"'])
    proc = subprocess.Popen(args, cwd=WORK, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(4)
    second = run(["train", "--resume", p("runs", "term")])
    rows.append(("a second trainer on the same directory", "error", outcome(second[0]),
                 outcome(second[0]) == "error" and "PID" in second[1], second[1][:150], second[2]))
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1].strip().splitlines()
    got = outcome(proc.returncode)
    rows.append(("SIGTERM during training", "preempted", got, got == "preempted",
                 (err[-1] if err else "")[:150], time.time() - t0))
    case("resume after SIGTERM", ["train", "--resume", p("runs", "term")], expect="ok")

    # 5. CLI misuse that used to panic, abort or hang.
    m = ["--model", "ghostnetv3_050"]
    case("bench --runs 0", ["bench"] + m + ["--runs", "0"])
    case("bench --min-secs nan", ["bench"] + m + ["--min-secs", "nan"])
    case("bench --tape --size 0", ["bench"] + m + ["--tape", "--size", "0"])
    case("bench --size 100000", ["bench"] + m + ["--size", "100000"])
    case("bench --threads 10000", ["bench"] + m + ["--threads", "10000", "--runs", "1"],
         timeout=60)
    case("info --size 100000", ["info"] + m + ["--size", "100000"])
    os.makedirs(p("imgs", "a"))
    os.makedirs(p("imgs", "b"))
    for c in "ab":
        for i in range(3):
            open(p("imgs", c, f"{i}.png"), "wb").write(png(40, 30 + 60 * i))
    case("eval --size 8 (train form)", ["eval"] + m + ["--branches", "2", "--weights", best,
         "--data", p("imgs"), "--size", "8", "--classes", "10"])
    case("predict --size 8", ["predict"] + m + ["--branches", "2", "--weights", best, "--size",
         "8", p("imgs", "a", "0.png")])
    for hw in [1, 0]:
        write_st(p(f"in{hw}.safetensors"), {"input": {"dtype": "F32", "shape": [1, 3, hw, hw],
                 "data_offsets": [0, 12 * hw * hw]}}, bytearray(12 * hw * hw))
        case(f"forward {hw}x{hw}", ["forward"] + m + ["--branches", "2", "--weights", best,
             "--inputs", p(f"in{hw}.safetensors"), "--out", p("o.safetensors")])
    images = " ".join([p("imgs", "a", "0.png")] * 200)
    code, msg, secs = run(f"{BIN} predict --model ghostnetv3_050 --branches 2 --weights {best} "
                          f"--size 64 {images} | head -1; exit ${{PIPESTATUS[0]}}",
                          shell=True)
    rows.append(("predict ... | head", "ok", outcome(code), code == 0 and "panick" not in msg,
                 msg[:150], secs))

    # 6. Recipe values accepted silently before.
    for s in ["augment.size=10000", "kd.teacher=\"resnet18\"", "optimizer.eps=0",
              "mixup.mixup_alpha=-1", "mixup.prob=2", "eval.std=[nan, 0.2, 0.2]",
              "augment.auto_augment=\"rand-m99-n999\"", "eval.crop_pct=1e9"]:
        extra = [s]
        if s.startswith("kd"):
            extra += [f'kd.teacher_weights="{best}"', "kd.temperature=nan"]
            s = "kd.temperature = nan"
        case(f"recipe: {s}", ["train", "--out", p("runs", "r" + str(len(rows)))] + sets(extra))
    case("--resume X --out Y", ["train", "--resume", p("base"), "--out", p("elsewhere")],
         expect="usage")

    # 7. Datasets: symlink loops (2 in train, 1 in val), an unreadable val image.
    for split in ["train", "val"]:
        shutil.copytree(p("imgs"), p("ds", split))
    for c in "ab":
        os.symlink("..", p("ds", "train", c, "loop"))
    os.symlink(p("ds"), p("ds", "val", "a", "loop2"))
    open(p("ds", "val", "b", "broken.png"), "wb").write(b"\x89PNG not really")
    ds = ["data.kind=\"imagefolder\"", f'data.root="{p("ds")}"', "train.batch_size=2",
          "train.eval_batch_size=4", "augment.size=48", "eval.size=48", "train.epochs=1",
          "schedule.epochs=1"]
    case("train: symlink loops, 6 images", ["train", "--out", p("runs", "loops")] + sets(ds),
         expect="ok", must="on 6 images", timeout=120)
    rows[-1] = rows[-1][:3] + (rows[-1][3] and "1 unreadable image(s) not scored" in run.full,) \
        + rows[-1][4:]
    for c in "ac":
        os.makedirs(p("imgs2", c))
        for i in range(3):
            open(p("imgs2", c, f"{i}.png"), "wb").write(png(40, 20 + 70 * i))
    case("train: train/val class names differ", ["train", "--out", p("runs", "names")] + sets(
        ds + [f'data.val_split="{p("imgs2")}"']), must="different classes")

    bad = [r for r in rows if not r[3]]
    print(f"| case | expected | got | as expected | last line | s |\n|---|---|---|---|---|---|")
    for name, expect, got, good, msg, secs in rows:
        msg = msg.replace("|", "/")
        print(f"| {name} | {expect} | {got} | {'yes' if good else '**no**'} | {msg} | {secs:.1f} |")
    counts = {k: sum(1 for r in rows if r[2] == k) for k in ["PANIC", "ABORT", "HANG"]}
    print(f"\n{len(rows)} cases: {len(rows) - len(bad)} as expected; panics {counts['PANIC']}, "
          f"aborts {counts['ABORT']}, hangs {counts['HANG']}")
    shutil.rmtree(WORK, ignore_errors=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
