#!/usr/bin/env bash
# Proves the Linux installer: builds the .deb with cargo-packager from the binary the tests
# already built, installs it with dpkg, runs the installed program, validates its desktop
# entry, removes it, and checks that only the person's own data is left. Needs root (dpkg).
#
#   packaging/check-deb.sh [PROFILE]    # PROFILE: debug (default, what `cargo test` built) or release
#
# CI runs it from .ci/run after the tests. cargo-packager is installed once into
# ~/.cache/studio-worker/tools (outside the clone, reused between runs).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${1:-debug}
target=${CARGO_TARGET_DIR:-target}
tools="$HOME/.cache/studio-worker/tools"
packager_version=0.11.8
packager=$(command -v cargo-packager || echo "$tools/bin/cargo-packager")
if ! "$packager" --version 2>/dev/null | grep -q "$packager_version"; then
  packager="$tools/bin/cargo-packager"
fi

if ! "$packager" --version 2>/dev/null | grep -q "$packager_version"; then
  echo "check-deb: installing cargo-packager $packager_version"
  cargo install --quiet --locked cargo-packager --version "$packager_version" --root "$tools" \
    --no-default-features --features cli,rustls-tls
fi

# cargo-packager takes the binary from <target>/<profile>/; stage a stripped copy there (the
# debug build keeps line tables for backtraces, which an installer does not need).
stage_profile=packaging-check
stage="$target/$stage_profile"
rm -rf "$stage" && mkdir -p "$stage"
cp "$target/$profile/studio-worker" "$stage/studio-worker"
strip "$stage/studio-worker"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$packager" packager --quite --formats deb --profile "$stage_profile" --out-dir "$out"
deb=$(ls "$out"/studio-worker_*.deb)
echo "check-deb: built $(basename "$deb") ($(du -h "$deb" | cut -f1))"

fail() { echo "check-deb: FAILED: $*" >&2; exit 1; }

# A person's home, so the installed program never touches the machine's own settings.
export HOME="$out/home" XDG_CONFIG_HOME="$out/home/.config" XDG_DATA_HOME="$out/home/.local/share"
mkdir -p "$HOME"

dpkg -i "$deb" >/dev/null
installed=$(dpkg -L studio-worker | while read -r path; do [ -f "$path" ] && echo "$path"; done)

version=$(/usr/bin/studio-worker --version)
[ "$version" = "studio-worker $(grep -m1 '^version' Cargo.toml | cut -d'"' -f2)" ] || fail "--version said: $version"
status=$(HF_ENDPOINT=http://127.0.0.1:9 /usr/bin/studio-worker status)
echo "$status" | grep -q "not running" || fail "status said: $status"
device=$(/usr/bin/studio-worker device)
echo "$device" | grep -q "^CPU" || fail "device said: $device"
desktop-file-validate /usr/share/applications/studio-worker.desktop || fail "desktop entry"
[ -f /usr/share/icons/hicolor/256x256/apps/studio-worker.png ] || fail "no 256 px icon"
grep -q "^Exec=studio-worker$" /usr/share/applications/studio-worker.desktop || fail "Exec"

# The person's data: settings written by the installed program.
/usr/bin/studio-worker pause >/dev/null
settings="$XDG_CONFIG_HOME/studio-worker/config.toml"
[ -f "$settings" ] || fail "pause did not save $settings"

dpkg -r studio-worker >/dev/null
for path in $installed; do
  [ ! -e "$path" ] || fail "$path is left after dpkg -r"
done
state=$(dpkg-query -W -f='${db:Status-Status}' studio-worker 2>/dev/null || true)
case "$state" in
  "" | not-installed) ;;
  *) fail "dpkg says studio-worker is $state after dpkg -r" ;;
esac
[ -f "$settings" ] || fail "dpkg -r removed the person's settings"
echo "check-deb: ok ($(echo "$installed" | wc -l) files installed and removed; settings kept)"
