#!/usr/bin/env bash
# On the GPU machine, from the project root, after benches/gpu/prepare.sh here:
#
#   device tool: carry ["cuda-build", ".whl"], command "benches/gpu/run.sh", timeout 600
#   or, to leave a session's 15 device minutes room for a rerun (the machine's start takes
#   minutes of them): command "BENCH_SECONDS=400 benches/gpu/run.sh", timeout 460
#
# Installs the carried wheels, puts the CUDA 13 libraries PyTorch ships on the loader path
# (the worker links cuBLAS, cuRAND and NVRTC), and runs bench.py: the pipelines, diffusers,
# the worker, one table; then, while the device call's time allows, the extras (SDXL with 12 GB
# free and SD-Turbo with a 6 GB card's, profiles of SDXL, SD-Turbo's one step and SD 1.5, SD 1.5 in the
# GTX 16 series' precision, SDXL with an 8 GB card's, then the implicit convolution, the graphs and
# our kernels each against what they replaced). Within 9 minutes on an H200; the tables are
# also in $OUT/gpu-bench.txt and $OUT/kernels-bench.txt (written as they run) when the device
# tool's OUT is set.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
CUDA_LIBS=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')
export LD_LIBRARY_PATH=$CUDA_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# The binaries travel compressed (prepare.sh): unpack them with Python's own lzma.
for packed in cuda-build/*.xz; do
  python3 -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as packed, open(sys.argv[2], "wb") as out: shutil.copyfileobj(packed, out)' \
    "$packed" "${packed%.xz}"
  chmod +x "${packed%.xz}"
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
cuobjdump --list-ptx --list-elf cuda-build/studio-worker | sort | uniq -c | head -20 || true
# The logs go straight to the device tool's OUT (when set), so that a run stopped at the
# call's limit still brings back what it measured.
logs=${OUT:-/tmp}
export PYTHONUNBUFFERED=1
# Our kernels first: checked against candle's on real job shapes, and timed (about 20 s).
STUDIO_BENCH_RUNS=20 cuda-build/kernels 2>&1 | tee "$logs/kernels-bench.txt" || true
# The bench keeps its extras within what is left of BENCH_SECONDS (540: a call of 600 s, 60 s
# spare), so that its tables are printed before the call's limit; the main table comes first.
python3 benches/gpu/bench.py --budget $((${BENCH_SECONDS:-540} - SECONDS)) --kernels-log "$logs/kernels-bench.txt" "$@" 2>&1 | tee "$logs/gpu-bench.txt"
