#!/usr/bin/env bash
# Proves what a CUDA build of studio-worker holds before it is packaged: candle's kernels are
# PTX for the one architecture the release names (CUDA_COMPUTE_CAP, 75: every RTX generation
# compiles it), and each of our kernel sources is a fatbin with machine code for every
# architecture build.rs lists plus that PTX. The release workflow runs it on Linux and on
# Windows (where our fatbins sit in the binary as plain data, so the build's own are read).
#
#   packaging/check-cuda-build.sh BINARY TARGET_DIR [PROFILE]   # PROFILE: release (default)
#
# CUOBJDUMP names the tool where it is not on PATH; Python compares bytes. Prints what it
# found; fails on the first thing missing.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=${1:?the CUDA build of studio-worker}
target=${2:?the cargo target folder it was built in}
profile=${3:-release}
cuobjdump=${CUOBJDUMP:-cuobjdump}
cap=${CUDA_COMPUTE_CAP:-75}
# Windows runners name it python; a python3 there may be the Store's stub, which runs nothing.
python=
for candidate in python3 python; do
  if "$candidate" -c 'import sys' > /dev/null 2>&1; then
    python=$candidate
    break
  fi
done

fail() {
  echo "check-cuda-build: $*" >&2
  exit 1
}
[ -n "$python" ] || fail "needs Python (python3 or python) to compare the fatbins with the binary"

# candle embeds its PTX as text, so its targets are read from the binary itself.
targets=$( (grep -a -o '\.target sm_[0-9a-z]*' "$binary" || true) | sort -u | tr '\n' ' ')
echo "candle's PTX targets: $targets"
[ "$targets" = ".target sm_$cap " ] || fail "candle's PTX should target sm_$cap and nothing else"

# The architectures build.rs compiles our kernels for, read from it (one list, no copy here).
architectures=$(grep -o 'const ARCHITECTURES: \[u32; [0-9]*\] = \[[0-9, ]*\]' build.rs |
  sed 's/.*= \[//; s/\]//; s/,/ /g' || true)
ptx_architecture=$(grep -o 'const PTX_ARCHITECTURE: u32 = [0-9]*' build.rs | grep -o '[0-9]*$' || true)
if [ -z "$architectures" ] || [ -z "$ptx_architecture" ]; then
  fail "no architecture list in build.rs"
fi

# Whether `binary` holds each of the files given, byte for byte.
holds() {
  "$python" -c 'import sys
binary = open(sys.argv[1], "rb").read()
sys.exit(any(open(path, "rb").read() not in binary for path in sys.argv[2:]))' "$binary" "$@"
}

# The build's own output folder: of studio-worker's build folders (a target folder may keep
# older ones), the newest with a fatbin for every kernel source, each held by the binary.
sources=(src/engine/kernels/*.cu)
out_dir=
for dir in $(ls -dt "$target/$profile"/build/studio-worker-*/out 2>/dev/null || true); do
  fatbins=()
  for source in "${sources[@]}"; do fatbins+=("$dir/$(basename "$source" .cu).fatbin"); done
  if ls "${fatbins[@]}" > /dev/null 2>&1 && holds "${fatbins[@]}"; then
    out_dir=$dir
    break
  fi
done
[ -n "$out_dir" ] || fail "no build folder under $target/$profile/build/ has a fatbin for every kernel source held by $binary"

for source in "${sources[@]}"; do
  name=$(basename "$source" .cu)
  fatbin="$out_dir/$name.fatbin"
  elf=" $("$cuobjdump" --list-elf "$fatbin" | grep -o 'sm_[0-9]*' | sort -u | tr '\n' ' ')"
  ptx=" $("$cuobjdump" --list-ptx "$fatbin" | grep -o 'sm_[0-9]*' | sort -u | tr '\n' ' ')"
  echo "$name: machine code for$elf; PTX for$ptx"
  for architecture in $architectures; do
    case "$elf" in *" sm_$architecture "*) ;; *) fail "$name has no machine code for sm_$architecture" ;; esac
  done
  [ "$ptx" = " sm_$ptx_architecture " ] || fail "$name's PTX should be for sm_$ptx_architecture alone"
done
echo "check-cuda-build: ok"
