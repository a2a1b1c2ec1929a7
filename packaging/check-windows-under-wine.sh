#!/usr/bin/env bash
# Runs the real Windows binary on this Linux machine, under Wine on a virtual display, and
# checks what only Windows code does: the good-guest probes (a full-screen foreground window,
# through the Win32 calls, with the desktop itself excepted; input idle time), the policy's
# decision from them, and a whole `generate` on the CPU, whose image must match the Linux
# build's. Then the whole test suite (`cargo test`: the library's tests, the engine's and the
# worker's against the in-process studio, the binary spawned as a child) runs under Wine too,
# where Windows' own rules apply: file handles that cannot be flushed read-only, symlinks
# refused, `\` in paths, the registry.
#
# The binary is built for x86_64-pc-windows-gnu (mingw-w64 links it; the release is msvc,
# which check-other-platforms.sh compiles), so what differs between the two toolchains is not
# covered, nor is anything Wine does differently from Windows: Wine sees input only while one
# of its windows is open, so the idle check opens one first.
#
# Needs: the target (`rustup target add x86_64-pc-windows-gnu`), mingw-w64's gcc
# (gcc-mingw-w64-x86-64), wine64, Xvfb, xdotool and python3; .ci/run installs them. Run from
# anywhere:   packaging/check-windows-under-wine.sh
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
  echo "check-windows-under-wine: FAILED: $*" >&2
  exit 1
}
say() { echo "check-windows-under-wine: $*"; }

target=x86_64-pc-windows-gnu
wine=$(command -v wine64 || command -v wine || echo /usr/lib/wine/wine64)
[ -x "$wine" ] || fail "no wine64 (Debian: wine64)"
command -v x86_64-w64-mingw32-gcc > /dev/null || fail "no mingw-w64 gcc (Debian: gcc-mingw-w64-x86-64)"
target_dir="${CARGO_TARGET_DIR:-target}"

cargo build --locked --target "$target" --bin studio-worker
cargo build --locked --bin studio-worker # the Linux build, for the image to compare with

work=$(mktemp -d)
xvfb_pid=""
cleanup() {
  WINEPREFIX="$work/prefix" "$(dirname "$wine")/wineserver" -k 2> /dev/null || true
  if [ -n "$xvfb_pid" ]; then kill "$xvfb_pid" 2> /dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
cp "$target_dir/$target/debug/studio-worker.exe" "$work/"

# Wine 8 (Debian 12's) lacks bcryptprimitives.dll, whose ProcessPrng Rust's standard library
# calls for random bytes: a stand-in beside the binary (and, for the test binaries, in the
# Wine prefix's system folder), over advapi32's RtlGenRandom.
cat > "$work/bcryptprimitives.c" <<'EOF'
#include <windows.h>
BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);
__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length) {
  while (length > 0) {
    ULONG chunk = length > 0x40000000 ? 0x40000000 : (ULONG)length;
    if (!SystemFunction036(data, chunk)) return FALSE;
    data += chunk;
    length -= chunk;
  }
  return TRUE;
}
EOF
x86_64-w64-mingw32-gcc -shared -O2 -o "$work/bcryptprimitives.dll" "$work/bcryptprimitives.c" -ladvapi32

# A game, as far as the probes can tell: a borderless window covering the monitor, in the
# foreground, titled "A Game", for a minute at most.
cat > "$work/game.c" <<'EOF'
#include <windows.h>
static LRESULT CALLBACK on_message(HWND window, UINT message, WPARAM w, LPARAM l) {
  if (message == WM_TIMER || message == WM_DESTROY) { PostQuitMessage(0); return 0; }
  return DefWindowProcW(window, message, w, l);
}
int WINAPI wWinMain(HINSTANCE instance, HINSTANCE previous, PWSTR command, int show) {
  WNDCLASSW kind = {0};
  kind.lpfnWndProc = on_message;
  kind.hInstance = instance;
  kind.lpszClassName = L"AGame";
  RegisterClassW(&kind);
  HWND window = CreateWindowExW(0, L"AGame", L"A Game", WS_POPUP | WS_VISIBLE, 0, 0,
                                GetSystemMetrics(SM_CXSCREEN), GetSystemMetrics(SM_CYSCREEN),
                                0, 0, instance, 0);
  SetForegroundWindow(window);
  SetTimer(window, 1, 60000, 0);
  MSG message;
  while (GetMessageW(&message, 0, 0, 0) > 0) DispatchMessageW(&message);
  return 0;
}
EOF
x86_64-w64-mingw32-gcc -municode -mwindows -O2 -o "$work/game.exe" "$work/game.c"
# The desktop window itself in the foreground, as Wine leaves it at times (and Windows, with
# nothing else focused): it covers the monitor, and is not a game.
cat > "$work/focus-desktop.c" <<'EOF'
#include <windows.h>
int main(void) { return SetForegroundWindow(GetDesktopWindow()) ? 0 : 1; }
EOF
x86_64-w64-mingw32-gcc -O2 -o "$work/focus-desktop.exe" "$work/focus-desktop.c"

# The display: Xvfb says its number once it listens; beside it comes its process id, in
# whichever order the two lines arrive.
exec 3< <(Xvfb -displayfd 1 -screen 0 1280x900x24 2> /dev/null & echo "pid $!")
display=""
for _ in 1 2; do
  read -r line <&3 || fail "Xvfb did not start"
  case "$line" in
    pid\ *) xvfb_pid=${line#pid } ;;
    *) display=$line ;;
  esac
done
[ -n "$display" ] || fail "Xvfb did not say its display"
export DISPLAY=":$display" WINEPREFIX="$work/prefix" WINEDEBUG=-all
worker() { timeout 300 "$wine" "$work/studio-worker.exe" "$@"; }
# A Linux path as the Windows binary sees it under Wine (drive Z: is /).
windows_path() { printf 'Z:%s' "${1//\//\\}"; }

# Reads `policy --json` from stdin and checks it with the Python expression given.
policy_holds() {
  python3 -c "
import json, sys
report = json.load(sys.stdin)
full_screen = report['fullScreen'].get('seen')
idle = report['idleS'].get('seen')
decision = report['decision']
pause = decision.get('pause') if isinstance(decision, dict) else None
ok = $1
if not ok:
    print(json.dumps(report), file=sys.stderr)
sys.exit(0 if ok else 1)"
}

version=$(worker --version) || fail "the binary does not start under Wine"
[[ "$version" == "studio-worker "* ]] || fail "--version printed: $version"
say "starts: $version"

# Nothing open, the desktop window in the foreground: not a game.
"$wine" "$work/focus-desktop.exe" || fail "the desktop window could not be brought to the foreground"
worker policy --json | policy_holds "full_screen is None and not (pause and pause['reason'] == 'game')" ||
  fail "with only the desktop in the foreground, the policy saw a full-screen program"
say "the desktop in the foreground: nothing full screen, no pause for a game"

"$wine" "$work/game.exe" &
seen=""
for _ in $(seq 40); do
  if worker policy --json | policy_holds "(full_screen or {}).get('program') == 'game.exe'" 2> /dev/null; then
    seen=1
    break
  fi
  sleep 0.5
done
[ -n "$seen" ] || fail "the full-screen window of game.exe was never seen"
worker policy --json |
  policy_holds "full_screen == {'program': 'game.exe', 'title': 'A Game'} and pause['reason'] == 'game'" ||
  fail "a full-screen game did not pause the worker"
say "a full-screen game: seen (game.exe, \"A Game\") and paused for"

# Input idle time: grows without input, and a mouse move resets it.
sleep 3
worker policy --json | policy_holds "idle >= 2.5" || fail "3 s without input did not read as idle"
xdotool mousemove 400 300 mousemove 420 320
worker policy --json | policy_holds "idle < 2.5" || fail "a mouse move did not reset the idle time"
say "idle time: grows without input, resets on a mouse move"

# A whole job on the CPU, against the Linux build's image of the same seed (the C runtime's
# maths differs a little: a level at most).
fixture=tests/fixtures/models/tiny-sd1
arguments=(generate --device cpu --prompt "a red fox" --width 64 --height 64 --steps 3 --seed 7)
worker "${arguments[@]}" --model-dir "$(windows_path "$(realpath "$fixture")")" \
  --out "$(windows_path "$work/windows.png")" > "$work/generate.log" 2>&1 ||
  { cat "$work/generate.log"; fail "generate failed under Wine"; }
"$target_dir/debug/studio-worker" "${arguments[@]}" --model-dir "$fixture" --out "$work/linux.png" > /dev/null 2>&1
python3 - "$work/windows.png" "$work/linux.png" <<'EOF' || fail "the Windows build's image differs from the Linux build's"
import struct, sys, zlib

def pixels(path):
    """An 8-bit RGB(A) PNG, not interlaced: its size and its values, row after row."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    at, compressed, header = 8, b"", None
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            compressed += body
        at += 12 + length
    width, height, depth, color, _, _, interlaced = header
    assert depth == 8 and color in (2, 6) and not interlaced, header
    channels = 3 if color == 2 else 4
    raw, stride, above, values = zlib.decompress(compressed), width * channels, bytearray(width * channels), []
    for y in range(height):
        start = y * (stride + 1)
        kind, row = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for x in range(stride):
            left = row[x - channels] if x >= channels else 0
            up, corner = above[x], above[x - channels] if x >= channels else 0
            guess = [0, left, up, (left + up) // 2, 0][kind]
            if kind == 4:
                p = left + up - corner
                guess = min((abs(p - left), 0, left), (abs(p - up), 1, up), (abs(p - corner), 2, corner))[2]
            row[x] = (row[x] + guess) & 255
        values += row
        above = row
    return (width, height), values

(size, windows), (linux_size, linux) = pixels(sys.argv[1]), pixels(sys.argv[2])
assert size == linux_size, (size, linux_size)
largest = max(abs(a - b) for a, b in zip(windows, linux))
print(f"check-windows-under-wine: generate: the Windows build's {size[0]}x{size[1]} image is within "
      f"{largest} level(s) of the Linux build's")
sys.exit(0 if largest <= 2 else 1)
EOF

# The app itself, as a person starts it: its window opens; start at login is set in the
# registry (the Run value names this binary, started in the tray); a second launch brings the
# first forward instead of starting another worker; `quit` ends it. No studio or hub answers.
app="$work/app"
mkdir -p "$app"
printf 'api_base_url = "http://127.0.0.1:9/api"\n' > "$app/config.toml"
app_config=$(windows_path "$app/config.toml")
HF_ENDPOINT=http://127.0.0.1:9 worker --config "$app_config" > "$work/app.log" 2>&1 &
app_pid=$!
run_key='HKCU\Software\Microsoft\Windows\CurrentVersion\Run'
run_value=""
for _ in $(seq 60); do
  run_value=$("$wine" reg query "$run_key" /v studio-worker 2> /dev/null | tr -d '\r' |
    sed -n 's/^ *studio-worker *REG_SZ *//p') || true
  [ -n "$run_value" ] && break
  sleep 0.5
done
expected="\"$(windows_path "$work/studio-worker.exe")\" --minimized"
[ "$run_value" = "$expected" ] ||
  { cat "$work/app.log"; fail "start at login: the Run value is '$run_value', not '$expected'"; }
say "the app starts and sets start at login: $run_value"
second=$(worker --config "$app_config" 2>&1) || fail "a second launch failed: $second"
[[ "$second" == *"already running"* ]] || fail "a second launch did not go to the first: $second"
say "a second launch brings the first forward"
worker --config "$app_config" quit --wait 60 > /dev/null || fail "quit did not end the app"
wait "$app_pid" || { cat "$work/app.log"; fail "the app did not exit cleanly after quit"; }
say "quit ends the app"

say "the Windows binary runs: probes, policy, a job and the app"

# The test suite, each test binary run by Wine (cargo's runner for the target); the prefix
# exists now, and its system folder gets the random-bytes stand-in. The CUDA kernels' CPU
# emulation is not required here: it builds the kernels with this Linux machine's C++ compiler,
# which a Windows program cannot start (the Linux suite runs it).
cp "$work/bcryptprimitives.dll" "$WINEPREFIX/drive_c/windows/system32/"
STUDIO_WORKER_EMULATION_TESTS="" CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER="$wine" \
  cargo test --locked --target "$target" ||
  fail "the test suite fails on Windows (under Wine)"
say "the test suite passes on Windows (under Wine)"
