#!/usr/bin/env bash
# Builds the CPU emulator of libcuda/libcublas (emu.cpp) with every kernel of cuda/*.cu compiled
# by g++ through shim.h, and the NCCL stand-in (nccl.cpp), into target/cuda-emu/ (libcuda.so.1,
# libcublas.so.13 and libnccl.so.2 are links to it). GHOSTV3_EMU_DEVICES (default 4) sets how
# many devices the emulator has. Then e.g.:
#   LD_LIBRARY_PATH=$PWD/target/cuda-emu:<folder of libnvrtc.so.13> cargo test --test cuda_ops
# runs the GPU tests on the CPU (slowly: one thread per CUDA thread).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=target/cuda-emu
mkdir -p "$OUT/src"
python3 - "$OUT/src" <<'PY'
import re, sys, pathlib
out = pathlib.Path(sys.argv[1])
common = pathlib.Path("cuda/common.cuh").read_text()
rep_args = ("int N, int C, int H, int W, int Ho, int Wo, int kh, int kw, int s, int ph, int pw, "
            "int NB, int has_scale, int has_id")
for cu in sorted(pathlib.Path("cuda").glob("*.cu")):
    src = cu.read_text()
    tramps = []
    for m in re.finditer(r'extern "C" __global__ void (\w+)\(([^)]*)\)', src):
        name, params = m.group(1), m.group(2).replace("REP_ARGS", rep_args)
        types = []
        for p in params.split(","):
            p = " ".join(p.replace("__restrict__", "").split())
            types.append(re.sub(r"\s*\b\w+$", "", p))
        args = ", ".join(f"*({t}*)a[{i}]" for i, t in enumerate(types))
        tramps.append(f'extern "C" void emu_tramp_{name}(void** a) {{ {name}({args}); }}')
    (out / f"{cu.stem}.cpp").write_text(
        '#include "shim.h"\n' + common + f'\n#line 1 "{cu.name}"\n' + src + "\n" + "\n".join(tramps) + "\n")
PY
FLAGS="-DEMU_DEVICES=${GHOSTV3_EMU_DEVICES:-4} -O2 -U_FORTIFY_SOURCE -std=c++20 -fPIC -ffp-contract=off -Wno-unknown-pragmas -Icuda/emu -pthread"
objs=()
pids=()
for f in "$OUT"/src/*.cpp cuda/emu/emu.cpp cuda/emu/nccl.cpp; do
  o="$OUT/$(basename "${f%.cpp}").o"
  g++ $FLAGS -c "$f" -o "$o" &
  pids+=($!)
  objs+=("$o")
done
for p in "${pids[@]}"; do wait "$p"; done
g++ -shared -pthread -o "$OUT/libghostv3_cuda_emu.so" "${objs[@]}" -ldl -lrt
ln -sf libghostv3_cuda_emu.so "$OUT/libcuda.so.1"
ln -sf libghostv3_cuda_emu.so "$OUT/libcuda.so"
ln -sf libghostv3_cuda_emu.so "$OUT/libcublas.so.13"
ln -sf libghostv3_cuda_emu.so "$OUT/libcublas.so"
# The NCCL stand-in (nccl.cpp) is in the same library, so its collectives share the stream queues.
ln -sf libghostv3_cuda_emu.so "$OUT/libnccl.so.2"
ln -sf libghostv3_cuda_emu.so "$OUT/libnccl.so"
echo "built $OUT/libghostv3_cuda_emu.so"
