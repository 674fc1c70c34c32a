#!/usr/bin/env bash
# ghostv3's CPU training step vs PyTorch eager + timm, in one run, on the same configurations:
# `ghostv3 bench --train` and scripts/bench_torch_train_cpu.py time the same step (train-mode
# forward, cross-entropy with label smoothing 0.1, backward, LAMB, EMA) of the same network
# (1000 classes, random weights) with the same number of threads. Each side runs each case
# twice, alternating (ours, torch, ours, torch), and the lower of its two medians is kept, so a
# burst of load from elsewhere hits both alike. Prints one table row per case: ms per step,
# images/s and peak RSS of both, and the ratios; train form against its own deploy form too.
#
#   scripts/bench_train_vs_torch.sh        # ghostnetv3_050/100; 224 px batch 8 and 64 px batch 64
#   MODELS="ghostnetv3_050" CASES="224:8" SECS=5 THREADS=2 scripts/bench_train_vs_torch.sh
#
# Needs python3 with torch and timm (pip install torch timm).
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS=${MODELS:-"ghostnetv3_050 ghostnetv3_100"}
CASES=${CASES:-"224:8 64:64"}
THREADS=${THREADS:-$(nproc)}
SECS=${SECS:-3}

python3 -c 'import torch, timm' 2>/dev/null || {
  echo "needs PyTorch and timm: pip install torch timm"
  exit 1
}
cargo build --release --quiet
BIN=target/release/ghostv3

field() { # line, regex with one group
  sed -E -n "s/.*$2.*/\1/p" <<<"$1"
}
ours() { # model size batch form -> "ms rss"
  local flag=""
  [ "$4" = train ] && flag="--train-form"
  local out
  out=$("$BIN" bench --train --model "$1" --size "$2" --batch "$3" $flag --threads "$THREADS" \
    --warmup 2 --runs 5 --min-secs "$SECS")
  echo "$(field "$out" 'median ([0-9.]+) ms') $(field "$out" 'peak RSS ([0-9.]+) MB')"
}
torch_() {
  local out
  out=$(python3 scripts/bench_torch_train_cpu.py --model "$1" --size "$2" --batch "$3" \
    --form "$4" --threads "$THREADS" --warmup 2 --runs 5 --min-secs "$SECS")
  echo "$(field "$out" 'median ([0-9.]+) ms') $(field "$out" 'peak RSS ([0-9.]+) MB')"
}
min() { python3 -c "print(min($1, $2))"; }

echo "CPU training step, $THREADS threads, $(python3 -c 'import torch; print("torch", torch.__version__)')"
echo
echo "| model | size | batch | form | ghostv3 ms | torch ms | torch/ghostv3 | ghostv3 img/s | ghostv3 RSS MB | torch RSS MB | RSS ratio |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for m in $MODELS; do
  for c in $CASES; do
    size=${c%%:*}
    batch=${c##*:}
    declare -A ours_ms=()
    for form in deploy train; do
      read -r a1 r1 <<<"$(ours "$m" "$size" "$batch" "$form")"
      read -r t1 q1 <<<"$(torch_ "$m" "$size" "$batch" "$form")"
      read -r a2 r2 <<<"$(ours "$m" "$size" "$batch" "$form")"
      read -r t2 q2 <<<"$(torch_ "$m" "$size" "$batch" "$form")"
      a=$(min "$a1" "$a2")
      t=$(min "$t1" "$t2")
      ours_ms[$form]=$a
      python3 - "$m" "$size" "$batch" "$form" "$a" "$t" "$r1" "$q1" <<'PY'
import sys
m, size, batch, form, a, t, r, q = sys.argv[1:]
a, t, r, q = float(a), float(t), float(r), float(q)
print(f"| {m} | {size} | {batch} | {form} | {a:.1f} | {t:.1f} | {t / a:.2f}x | {int(batch) * 1e3 / a:.1f} | {r:.0f} | {q:.0f} | {r / q:.2f} |")
PY
    done
    python3 -c "print(f'|   |   |   | train / deploy (ghostv3) | {${ours_ms[train]} / ${ours_ms[deploy]}:.2f}x |||||||')"
  done
done
