#!/usr/bin/env python3
"""Draws the app icon (PNGs and a multi-size Windows .ico) and the tray icon variants (no
dependencies beyond Python).

    python3 assets/icons/generate.py

The mark: a violet disc with a four-pointed spark (a GPU making an image). Tray variants add a
badge at the bottom right: green dot (working), no badge (idle), amber pause bars (paused),
red "!" (needs attention). Drawn at 4x and box-filtered down for smooth edges.
"""
import math
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
VIOLET = (124, 92, 255)
SPARK = (255, 255, 255)
BADGES = {
    "working": (34, 197, 94),
    "paused": (245, 158, 11),
    "attention": (239, 68, 68),
}
SS = 4  # supersampling factor


def spark_inside(x, y, cx, cy, r):
    # A four-pointed star: |dx|^p + |dy|^p <= r^p with p < 1 gives concave sides.
    dx, dy = abs(x - cx) / r, abs(y - cy) / r
    p = 0.55
    return dx ** p + dy ** p <= 1.0


def draw(size, badge):
    n = size * SS
    px = [[(0, 0, 0, 0)] * n for _ in range(n)]
    c = n / 2
    disc_r = n * 0.46
    spark_r = n * 0.30
    badge_c = n * 0.76
    badge_r = n * 0.22
    for y in range(n):
        for x in range(n):
            fx, fy = x + 0.5, y + 0.5
            colour = None
            if math.hypot(fx - c, fy - c) <= disc_r:
                colour = VIOLET + (255,)
                if spark_inside(fx, fy, c, c, spark_r):
                    colour = SPARK + (255,)
            if badge:
                d = math.hypot(fx - badge_c, fy - badge_c)
                if d <= badge_r + n * 0.04:
                    colour = (255, 255, 255, 255)  # a ring that separates badge and mark
                if d <= badge_r:
                    colour = BADGES[badge] + (255,)
                    rel_x, rel_y = (fx - badge_c) / badge_r, (fy - badge_c) / badge_r
                    if badge == "paused" and abs(rel_y) < 0.5 and 0.15 < abs(rel_x) < 0.45:
                        colour = (255, 255, 255, 255)
                    if badge == "attention" and abs(rel_x) < 0.14 and (-0.6 < rel_y < 0.2 or 0.38 < rel_y < 0.62):
                        colour = (255, 255, 255, 255)
            if colour:
                px[y][x] = colour
    out = []
    for y in range(size):
        row = []
        for x in range(size):
            acc = [0, 0, 0, 0]
            for sy in range(SS):
                for sx in range(SS):
                    r, g, b, a = px[y * SS + sy][x * SS + sx]
                    acc[0] += r * a
                    acc[1] += g * a
                    acc[2] += b * a
                    acc[3] += a
            alpha = acc[3] / (SS * SS)
            if acc[3]:
                row.append(tuple(round(v / acc[3]) for v in acc[:3]) + (round(alpha),))
            else:
                row.append((0, 0, 0, 0))
        out.append(row)
    return out


def write_png(path, pixels):
    height, width = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + bytes(v for p in row for v in p) for row in pixels)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9))
    png += chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def png_bytes(pixels):
    height, width = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + bytes(v for p in row for v in p) for row in pixels)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def write_ico(path, images):
    """A Windows icon with one PNG-compressed image per size (Windows Vista and later)."""
    header = struct.pack("<HHH", 0, 1, len(images))
    offset = len(header) + 16 * len(images)
    entries, data = b"", b""
    for size, png in images:
        side = 0 if size >= 256 else size  # 0 means 256 in an ICONDIRENTRY
        entries += struct.pack("<BBBBHHII", side, side, 0, 0, 1, 32, len(png), offset + len(data))
        data += png
    with open(path, "wb") as f:
        f.write(header + entries + data)


def main():
    ico_images = []
    for size in (16, 32, 48, 64, 128, 256):
        pixels = draw(size, None)
        if size in (32, 64, 128, 256):
            write_png(os.path.join(HERE, f"app-{size}.png"), pixels)
        ico_images.append((size, png_bytes(pixels)))
    # Windows: the installer's and the shortcuts' icon, sharp from 100 % to 200 % scaling.
    write_ico(os.path.join(HERE, "app.ico"), ico_images)
    for state in ("idle", "working", "paused", "attention"):
        for size in (32, 64):
            write_png(os.path.join(HERE, f"tray-{state}-{size}.png"), draw(size, None if state == "idle" else state))


if __name__ == "__main__":
    main()
