#!/usr/bin/env bash
# ghostv3's fast CPU path vs ONNX Runtime, in one run, on the same network and weights: for each
# model, `ghostv3 export` writes the ONNX file of exactly the network `ghostv3 bench` times (same
# seeded random weights, folded deploy form); ORT runs it with ORT_ENABLE_ALL and the same number
# of intra-op threads. Each side is timed twice, alternating (ours, ORT, ours, ORT), and the lower
# of its two medians is reported, so a burst of load from elsewhere hits both sides alike.
#
#   scripts/bench_vs_ort.sh                      # ghostnetv3_050/100/160, mobilenetv2_100; b1, b8
#   MODELS="ghostnetv3_100" BATCHES="1" SECS=5 THREADS=2 SIZE=224 scripts/bench_vs_ort.sh
#
# Needs python3 with onnxruntime and numpy (pip install onnxruntime numpy).
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS=${MODELS:-"ghostnetv3_050 ghostnetv3_100 ghostnetv3_160 mobilenetv2_100"}
BATCHES=${BATCHES:-"1 8"}
THREADS=${THREADS:-2}
SIZE=${SIZE:-224}
SECS=${SECS:-3}

python3 -c 'import onnxruntime, numpy' 2>/dev/null || {
  echo "needs ONNX Runtime: pip install onnxruntime numpy"
  exit 1
}
cargo build --release --quiet
BIN=target/release/ghostv3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ours() { # model batch -> median ms
  "$BIN" bench --model "$1" --batch "$2" --size "$SIZE" --threads "$THREADS" --min-secs "$SECS" |
    sed -n 's/.*median \([0-9.]*\) ms.*/\1/p'
}
ort() { # onnx batch -> median ms
  python3 scripts/ort_tool.py bench "$1" --batch "$2" --size "$SIZE" --threads "$THREADS" \
    --min-secs "$SECS" | sed -n 's/.*median_ms=\([0-9.]*\).*/\1/p'
}
min() { awk -v a="$1" -v b="$2" 'BEGIN { print (a < b) ? a : b }'; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs);" \
  "onnxruntime $(python3 -c 'import onnxruntime; print(onnxruntime.__version__)');" \
  "$SIZE x $SIZE, $THREADS threads; load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| model | batch | ghostv3 ms (median) | ORT ms (median) | ghostv3 / ORT | ghostv3 images/s | ORT images/s |"
echo "|---|---|---|---|---|---|---|"
for m in $MODELS; do
  "$BIN" export --model "$m" --out "$tmp/$m.onnx" --size "$SIZE" >/dev/null
  for b in $BATCHES; do
    o1=$(ours "$m" "$b")
    r1=$(ort "$tmp/$m.onnx" "$b")
    o2=$(ours "$m" "$b")
    r2=$(ort "$tmp/$m.onnx" "$b")
    o=$(min "$o1" "$o2")
    r=$(min "$r1" "$r2")
    awk -v m="$m" -v b="$b" -v o="$o" -v r="$r" 'BEGIN {
      printf "| %s | %d | %.2f | %.2f | %.2f | %.1f | %.1f |\n", m, b, o, r, o / r, b * 1000 / o, b * 1000 / r
    }'
  done
done
echo
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
