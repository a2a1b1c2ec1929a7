#!/usr/bin/env bash
# Screenshots of the real app for the README: the debug binary under Xvfb, against the dev
# studio, one PNG per tab. Needs Debian's xvfb, xauth, imagemagick, xdotool, dbus-x11 and
# libgl1-mesa-dri (software OpenGL).
#
#   docs/screenshots/take.sh            # from the project root; writes docs/screenshots/*.png
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
out=docs/screenshots
target=${CARGO_TARGET_DIR:-target}
cargo build -q --bin studio-worker --example dev_studio
work=$(mktemp -d)
display=:97
port=8797
Xvfb "$display" -screen 0 1280x900x24 >/dev/null 2>&1 & xvfb=$!
"$target/debug/examples/dev_studio" --listen "127.0.0.1:$port" >/dev/null 2>&1 & studio=$!
trap 'kill $app $studio $xvfb 2>/dev/null || true; rm -rf "$work"' EXIT
printf 'api_base_url = "http://127.0.0.1:%s/api"\nworker_name = "Alice'"'"'s desktop"\n\n[policy]\nalways_pause_for = ["Cyberpunk2077.exe"]\n' "$port" > "$work/config.toml"
# A download of SDXL-Turbo that stopped part way (sparse: no disk used), which Settings
# offers to delete.
mkdir -p "$work/hf-cache/models--stabilityai--sdxl-turbo/blobs"
truncate -s 1200000000 "$work/hf-cache/models--stabilityai--sdxl-turbo/blobs/0123abcd.incomplete"
sleep 1
# No real hub: the app would start downloading the default model (the Status tab then shows
# why it cannot).
DISPLAY=$display HF_ENDPOINT=http://127.0.0.1:9 HF_HUB_CACHE="$work/hf-cache" XDG_CONFIG_HOME="$work/xdg" \
  dbus-run-session -- "$target/debug/studio-worker" --config "$work/config.toml" >"$work/app.log" 2>&1 & app=$!
sleep 5
window=$(DISPLAY=$display xdotool search --name '^studio-worker$' | head -1)
shot() { DISPLAY=$display import -window "$window" "$out/$1.png"; }
click() { DISPLAY=$display xdotool mousemove --window "$window" "$1" "$2" click 1; sleep 1; }

shot status-pending
curl -sf -X POST "http://127.0.0.1:$port/operator/requests/rr_0001/approve" >/dev/null
sleep 4
shot status-approved
click 89 16 && shot jobs
click 150 16 && shot settings
# The policy's section, further down the Settings tab.
DISPLAY=$display xdotool mousemove --window "$window" 360 400 click --repeat 12 5; sleep 1
# Show the schedule's grid (ticked in the form, not saved).
click 15 342
DISPLAY=$display xdotool mousemove --window "$window" 360 400 click --repeat 12 5; sleep 1
shot settings-policy
# A "game" starts (a program on the person's always-pause list; the policy reads the process
# list every few seconds): the Status tab says which and when work resumes.
cp "$(command -v sleep)" "$work/Cyberpunk2077"
"$work/Cyberpunk2077" 600 & game=$!
trap 'kill $app $studio $xvfb $game 2>/dev/null || true; rm -rf "$work"' EXIT
sleep 8
click 40 16 && shot status-game
echo "screenshots in $out"
