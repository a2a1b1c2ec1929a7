#!/usr/bin/env bash
# Compiles, from this Linux machine, the code only the Windows and macOS releases build: the
# same `cargo clippy` runs as .github/workflows/check.yml (every target of the debug build, and
# the release binary: Windows' windowed one, macOS' with Metal), against the release targets'
# standard library from rustup. Nothing is linked, so the C that build scripts compile
# (aws-lc-sys under rustls) needs no Windows or macOS compiler: a stand-in compiler and
# archiver write empty objects and archives for them. What this cannot see is what only a link
# or a run shows; check.yml and the release workflow build for real.
#
# Needs the targets installed first (`rustup target add x86_64-pc-windows-msvc
# aarch64-apple-darwin`; .ci/run does so where rustup can fetch them). Run from anywhere:
#   packaging/check-other-platforms.sh
set -euo pipefail
cd "$(dirname "$0")/.."

stand_ins=$(mktemp -d)
trap 'rm -rf "$stand_ins"' EXIT

# The compiler: an empty object wherever one is asked for (`-o out`, `-oout`, `-Foout`,
# `/Foout`, `-Fo:out`), and success for every probe a build script makes.
cat > "$stand_ins/cc" <<'EOF'
#!/bin/sh
out=""
next_is_out=""
for arg in "$@"; do
  if [ -n "$next_is_out" ]; then out="$arg"; next_is_out=""; continue; fi
  case "$arg" in
    -o) next_is_out=1 ;;
    -Fo:*|/Fo:*) out="${arg#*:}" ;;
    -Fo*|/Fo*) out="${arg#???}" ;;
    -o*) out="${arg#-o}" ;;
  esac
done
if [ -n "$out" ]; then : > "$out"; fi
exit 0
EOF
# The archiver: the archive it is asked for, empty (`-out:x` / `/OUT:x` as lib.exe takes it,
# else the first argument naming an archive, as ar takes it).
cat > "$stand_ins/ar" <<'EOF'
#!/bin/sh
for arg in "$@"; do
  case "$arg" in
    -out:*|-OUT:*|/out:*|/OUT:*) : > "${arg#*:}"; exit 0 ;;
  esac
done
for arg in "$@"; do
  case "$arg" in
    *.a|*.lib) : > "$arg"; exit 0 ;;
  esac
done
exit 0
EOF
chmod +x "$stand_ins/cc" "$stand_ins/ar"

check() {
  local target=$1
  shift
  local variable
  variable=$(echo "$target" | tr '-' '_')
  echo "check-other-platforms: cargo clippy --target $target $*"
  env "CC_$variable=$stand_ins/cc" "CXX_$variable=$stand_ins/cc" "AR_$variable=$stand_ins/ar" \
    cargo clippy --locked --target "$target" "$@" -- -D warnings
}

check x86_64-pc-windows-msvc --all-targets
# The release is a windowed program (cfg not(debug_assertions)): its own code path.
check x86_64-pc-windows-msvc --release --bin studio-worker
check aarch64-apple-darwin --all-targets
check aarch64-apple-darwin --release --features metal --bin studio-worker
echo "check-other-platforms: Windows and macOS compile"
