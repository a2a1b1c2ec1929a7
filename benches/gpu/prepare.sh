#!/usr/bin/env bash
# Here (no GPU needed): everything benches/gpu/run.sh needs on the GPU machine.
#
#   benches/gpu/prepare.sh
#
# - cuda-build/studio-worker.xz: the release binary with --features cuda, PTX for sm_75
#   (every RTX, as the installers ship it), built by ../shared/tools/cuda-cross-build.sh,
#   stripped and compressed (42 MiB stripped, 9 MiB as xz: the device tool carries 64 MiB at
#   most; run.sh unpacks it);
# - cuda-build/dev_studio.xz: the dev studio (no CUDA in it), for the studio-job runs;
# - cuda-build/kernels.xz: benches/kernels.rs with --features cuda: our kernels against
#   candle's on GPU 0, checked and timed on real job shapes;
# - cuda-build/commit: the commit they were built from;
# - .whl/: diffusers and the one package it needs that the GPU machine lacks, as wheels.
# Then, with the device tool: carry ["cuda-build", ".whl"], command "benches/gpu/run.sh".
set -euo pipefail
cd "$(dirname "$0")/../.."
CUDA_COMPUTE_CAP=75 ../shared/tools/cuda-cross-build.sh
# What the binary holds, checked as the release checks it (packaging/check-cuda-build.sh:
# candle's PTX for sm_75, our fatbins for every architecture), with a cuobjdump from PyPI
# (any 13.x lists 13.0's fatbins).
tools=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: -d "$tools" nvidia-cuda-cuobjdump==13.2.86
python3 -m zipfile -e "$tools"/nvidia_cuda_cuobjdump-*.whl "$tools/wheel"
chmod +x "$tools/wheel/nvidia/cu13/bin/cuobjdump"
CUOBJDUMP="$tools/wheel/nvidia/cu13/bin/cuobjdump" CUDA_COMPUTE_CAP=75 \
  packaging/check-cuda-build.sh cuda-build/studio-worker "${CARGO_TARGET_DIR:-target}"
rm -rf "$tools"
kernels_bench=$(CUDA_COMPUTE_CAP=75 ../shared/tools/cuda-cross-build.sh \
  cargo bench --features cuda --bench kernels --no-run --message-format=json \
  | python3 -c 'import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message["target"]["name"] == "kernels" \
            and message.get("executable"):
        print(message["executable"])')
cp "$kernels_bench" cuda-build/kernels
cargo build --release --example dev_studio
cp "${CARGO_TARGET_DIR:-target}/release/examples/dev_studio" cuda-build/dev_studio
for binary in cuda-build/studio-worker cuda-build/dev_studio cuda-build/kernels; do
  strip "$binary"
  xz -T0 -6 -f "$binary"
done
# Which main the artifacts are from: a later session reuses them only while src/ is unchanged.
{
  git rev-parse HEAD
  git diff --quiet HEAD -- src build.rs Cargo.toml Cargo.lock benches || echo "plus uncommitted changes"
} > cuda-build/commit
ls -l cuda-build/
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
  diffusers==0.42.1 importlib_metadata==8.7.0
ls -l .whl
du -shc cuda-build .whl | tail -1
