#!/usr/bin/env bash
# The GPU check of the CUDA backend in one bounded call: the device report, every CUDA launcher
# and fused kernel against the CPU backend (tests/cuda_*.rs: ops, the whole training step, the
# fused 1x1 rep_conv, the pinned-buffer prefetcher), a short `train --device cuda` run of the
# default recipe, the kernel benchmarks (benches/cuda.rs) and the PyTorch eager + timm training
# throughput (scripts/bench_torch_train.py), then a short table.
#
#   scripts/gpu-check.sh prepare   here (with cargo): build the test, bench and CLI binaries and
#                                  copy them, stripped, to .gpu/bin (git-ignored, carried)
#   scripts/gpu-check.sh run       on the GPU machine (no Rust there): run .gpu/bin/*
#   scripts/gpu-check.sh           both, where cargo and a GPU are on the same machine
#
# With the device tool: `scripts/gpu-check.sh prepare` here, then
#   run(command="bash scripts/gpu-check.sh run", carry=[".gpu"], timeout_s=540)
# Logs go to $OUT (the device tool's folder) or target/gpu-check. Every step has a timeout, so
# the whole run stays under ~9.5 minutes even when something hangs.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.gpu/bin
TESTS="cuda_ops cuda_ops_more cuda_rep_1x1 cuda_prefetch cuda_optim cuda_traffic"
LOG="${OUT:-target/gpu-check}"
mkdir -p "$LOG"

exe_of() { # cargo JSON messages on stdin -> the executable of the named target
  python3 -c 'import json,sys
name=sys.argv[1]
for l in sys.stdin:
    try: m=json.loads(l)
    except Exception: continue
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]==name:
        print(m["executable"])' "$1" | tail -1
}

prepare() {
  set -e
  mkdir -p "$BIN"
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  cargo build --release --bin ghostv3
  local t b
  for t in $TESTS; do
    strip -o "$BIN/$t" "$(cargo test --release --no-run --test "$t" --message-format=json | exe_of "$t")"
  done
  b=$(cargo bench --no-run --bench cuda --message-format=json | exe_of cuda)
  strip -o "$BIN/ghostv3" target/release/ghostv3
  strip -o "$BIN/cuda_bench" "$b"
  du -sh "$BIN"/*
  set +e
}

run() {
  [ -x "$BIN/cuda_ops" ] || { echo "no $BIN/cuda_ops: run 'scripts/gpu-check.sh prepare' first"; exit 1; }
  # CUDA 13 NVRTC and cuBLAS: the toolkit, else the pip wheels next to PyTorch.
  local extra=""
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && extra="$extra:$d"
  done
  local py
  py=$(python3 -c 'import glob,os,nvidia; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d+"/**/lib/lib*.so*", recursive=True)})))' 2>/dev/null)
  export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}$extra${py:+:$py}"
  export GHOSTV3_CACHE_DIR="${GHOSTV3_CACHE_DIR:-$LOG/cache}"
  export GHOSTV3_BIN="$BIN/ghostv3"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader 2>&1 | tee "$LOG/nvidia-smi.txt"

  echo "== ghostv3 info --device cuda"
  timeout 60 "$BIN/ghostv3" info --model ghostnetv3_100 --device cuda 2>&1 | tee "$LOG/info.log"
  local info_rc=${PIPESTATUS[0]}

  local test_rc=0 t
  for t in $TESTS; do
    echo "== CUDA vs CPU: tests/$t.rs"
    timeout 120 "$BIN/$t" --test-threads=1 --nocapture 2>&1 | tee "$LOG/$t.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || test_rc=1
  done

  echo "== ghostv3 train --device cuda (default recipe: synthetic, 64 px, 6 epochs; CPU: 27.54%)"
  rm -rf "$LOG/train-cuda"
  timeout 120 "$BIN/ghostv3" train --device cuda --out "$LOG/train-cuda" 2>&1 | tee "$LOG/train.log"
  local train_rc=${PIPESTATUS[0]}

  echo "== train --gpus 1: the data-parallel path (NCCL world size 1, sync_bn on), 2 epochs"
  rm -rf "$LOG/train-nccl"
  timeout 90 "$BIN/ghostv3" train --gpus 1 --out "$LOG/train-nccl" --set train.epochs=2 \
    --set schedule.epochs=2 --set train.sync_bn=true 2>&1 | tee "$LOG/nccl.log"
  local nccl_rc=${PIPESTATUS[0]}

  echo "== CUDA kernel benches"
  timeout 180 "$BIN/cuda_bench" 2>&1 | tee "$LOG/bench.log"
  local bench_rc=${PIPESTATUS[0]}

  echo "== the step counted (bytes, launches) and timed: ghostv3 vs PyTorch eager's count"
  timeout 90 "$BIN/ghostv3" bench --train --train-form --device cuda --profile --model ghostnetv3_100 \
    --size 224 --batch 256 --warmup 3 --runs 10 --min-secs 2 --json "$LOG/ours-counts.json" 2>&1 | tee "$LOG/counts.log"
  local counts_rc=${PIPESTATUS[0]}
  timeout 60 python3 scripts/count_torch_step.py --model ghostnetv3_100 --form train \
    --ours "$LOG/ours-counts.json" 2>&1 | tee -a "$LOG/counts.log"

  echo "== PyTorch eager + timm training throughput"
  PYTHONUNBUFFERED=1 timeout 150 python3 scripts/bench_torch_train.py --batch 256 --steps 8 --warmup 3 2>&1 | tee "$LOG/torch.log"
  local torch_rc=${PIPESTATUS[0]}

  echo
  echo "================ gpu-check summary ================"
  head -1 "$LOG/nvidia-smi.txt"
  printf '%-34s %s\n' "info --device cuda (rc $info_rc)" "$(grep -E '^kernels:|^CUDA:' "$LOG/info.log" | head -1)"
  for t in $TESTS; do
    printf '%-34s %s\n' "$t vs CPU (rc $test_rc)" "$(grep -E '^test result' "$LOG/$t.log" | tail -1)"
    grep -E "^test .* FAILED|panicked at|max err .* >" "$LOG/$t.log" | head -8
  done
  printf '%-34s %s\n' "train --device cuda (rc $train_rc)" "$(grep -E '^best val|^epoch 6' "$LOG/train.log" | tr '\n' ' ')"
  printf '%-34s %s\n' "train --gpus 1 (rc $nccl_rc)" "$(grep -E 'NCCL communicator|bit-identical.*epoch 2|^epoch 2' "$LOG/nccl.log" | tr '\n' ' ')"
  echo "-- kernels (bench rc $bench_rc)"
  sed -n '/^kernel /,$p' "$LOG/bench.log" | head -20
  echo "-- training throughput, ghostnetv3_100 train form, 224x224 (bench rc $bench_rc, torch rc $torch_rc)"
  grep -E "CUDA train step|deploy form step" "$LOG/bench.log"
  grep -E "images/s|skipped" "$LOG/torch.log"
  echo "-- the step counted (counts rc $counts_rc)"
  grep -E "^total:|H100|H200|training step|ours/torch" "$LOG/counts.log"
  [ "$test_rc" -eq 0 ] && [ "$info_rc" -eq 0 ] && [ "$train_rc" -eq 0 ]
}

case "${1:-all}" in
  prepare) prepare ;;
  run) run ;;
  all)
    command -v cargo >/dev/null || { echo "cargo not found: use 'prepare' on a machine with Rust, then 'run'"; exit 1; }
    prepare && run ;;
  *) echo "usage: $0 [prepare|run]"; exit 2 ;;
esac
