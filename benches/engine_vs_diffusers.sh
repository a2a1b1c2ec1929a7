#!/usr/bin/env bash
# candle (ours) against diffusers/PyTorch on the same architectures, step counts and sizes,
# on this machine, in one run. Needs the fixture venv (tests/fixtures/requirements.txt):
#
#   PYTHON=/tmp/pyref/bin/python benches/engine_vs_diffusers.sh [--sd21]
#
# --sd21 also times a full-size SD 2.1-architecture UNet at 512×512 (random weights, 3.5 GB
# written to $SD21_DIR, default /tmp/sd21-random).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SD21_DIR=${SD21_DIR:-/tmp/sd21-random}
threads=$(nproc)
reference_args=(--fixtures tests/fixtures/models)
if [[ "${1:-}" == "--sd21" ]]; then
    if [[ ! -f "$SD21_DIR/unet/diffusion_pytorch_model.safetensors" ]]; then
        "$PYTHON" benches/diffusers_reference.py --fixtures tests/fixtures/models --make-sd21-unet "$SD21_DIR"
    fi
    reference_args+=(--sd21-unet "$SD21_DIR")
    export STUDIO_BENCH_SD21_DIR=$SD21_DIR
fi
# Both sides get every core.
reference=$(OMP_NUM_THREADS=$threads "$PYTHON" benches/diffusers_reference.py "${reference_args[@]}" 2>/dev/null | tail -1)
ours=$(cargo bench --quiet --bench engine 2>/dev/null | tail -1)
"$PYTHON" - "$reference" "$ours" <<'PY'
import json, sys
reference, ours = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"{'measure':32} {'diffusers':>11} {'candle':>11} {'candle/diffusers':>17}")
for key in sorted(reference):
    if key in ours:
        print(f"{key:32} {reference[key]*1000:9.1f}ms {ours[key]*1000:9.1f}ms {ours[key]/reference[key]:16.2f}x")
PY
