"""A dependency-free line-plot PNG writer (numpy + zlib + struct), used for the loss curve.

`plot_lines(path, series, ...)` draws one or more (x, y) series on white with axes, 5 tick marks per axis
labelled by a built-in 3x5 pixel font (digits, '.', '-', 'e', letters used in titles), and writes an 8-bit
RGB PNG. Good enough to see a loss curve fall; not a plotting library.
"""
from __future__ import annotations

import struct
import zlib
from typing import Iterable, List, Sequence, Tuple

import numpy as np

# 3x5 glyphs, rows top to bottom, bits left to right
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111111100111", "+": "000010111010000", " ": "000000000000000", ":": "000010000010000",
    "a": "000011101101011", "l": "110010010010111", "n": "000110101101101", "o": "000111101101111",
    "p": "000111101111100", "r": "000111100100100", "s": "000011110001110", "t": "010111010010011",
    "i": "010000010010010", "v": "000101101101010", "d": "001001111101111", "g": "000111101111001",
    "m": "000111111101101", "c": "000111100100111", "h": "100100111101101", "u": "000101101101111",
    "w": "000101101111111", "x": "000101010010101", "y": "000101111001111", "k": "100101110101101",
}
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: str, image: np.ndarray) -> None:
    """image [H, W, 3] uint8 -> PNG file (colour type 2, 8 bits, no interlace)."""
    height, width, _ = image.shape
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(height))  # filter type 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9))
                + _chunk(b"IEND", b""))


def _text(image: np.ndarray, x: int, y: int, text: str, scale: int = 2, colour=(0, 0, 0)) -> None:
    for k, ch in enumerate(text.lower()):
        glyph = _FONT.get(ch, _FONT[" "])
        for i, bit in enumerate(glyph):
            if bit == "1":
                r, c = divmod(i, 3)
                y0, x0 = y + r * scale, x + (k * 4 + c) * scale
                image[max(y0, 0):max(y0 + scale, 0), max(x0, 0):max(x0 + scale, 0)] = colour


def _line(image: np.ndarray, x0: float, y0: float, x1: float, y1: float, colour, width: int = 1) -> None:
    steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.linspace(x0, x1, steps).round().astype(int)
    ys = np.linspace(y0, y1, steps).round().astype(int)
    h, w, _ = image.shape
    for dx in range(-(width // 2), width - width // 2):
        for dy in range(-(width // 2), width - width // 2):
            keep = (xs + dx >= 0) & (xs + dx < w) & (ys + dy >= 0) & (ys + dy < h)
            image[ys[keep] + dy, xs[keep] + dx] = colour


def _label(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def plot_lines(path: str, series: Sequence[Tuple[Sequence[float], Sequence[float]]], title: str = "",
               size: Tuple[int, int] = (640, 400)) -> None:
    """Plot each (xs, ys) series as a polyline (colours in order) and write the PNG to `path`."""
    width, height = size
    left, right, top, bottom = 70, 20, 30, 40
    image = np.full((height, width, 3), 255, np.uint8)
    points = [(np.asarray(x, float), np.asarray(y, float)) for x, y in series if len(x)]
    finite: List[np.ndarray] = [y[np.isfinite(y)] for _, y in points]
    if not points or not any(len(f) for f in finite):
        _text(image, left, height // 2, "no data")
        write_png(path, image)
        return
    x_min = min(x.min() for x, _ in points)
    x_max = max(x.max() for x, _ in points)
    y_min = min(f.min() for f in finite if len(f))
    y_max = max(f.max() for f in finite if len(f))
    if x_max == x_min:
        x_max = x_min + 1
    if y_max == y_min:
        y_max, y_min = y_max + 0.5, y_min - 0.5
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x):
        return left + (x - x_min) / (x_max - x_min) * plot_w

    def py(y):
        return top + (y_max - y) / (y_max - y_min) * plot_h

    axis = (0, 0, 0)
    _line(image, left, top, left, top + plot_h, axis)
    _line(image, left, top + plot_h, left + plot_w, top + plot_h, axis)
    integer_x = all(np.all(x == np.round(x)) for x, _ in points)
    for k in range(5):
        xv = x_min + (x_max - x_min) * k / 4
        yv = y_min + (y_max - y_min) * k / 4
        if integer_x:
            xv = float(round(xv))
        _line(image, px(xv), top + plot_h, px(xv), top + plot_h + 5, axis)
        _text(image, int(px(xv)) - 8, top + plot_h + 10, f"{int(xv)}" if integer_x else _label(xv))
        _line(image, left - 5, py(yv), left, py(yv), axis)
        _text(image, 4, int(py(yv)) - 5, _label(yv))
    for i, (x, y) in enumerate(points):
        colour = COLOURS[i % len(COLOURS)]
        ok = np.isfinite(y)
        xs, ys = x[ok], y[ok]
        for j in range(len(xs) - 1):
            _line(image, px(xs[j]), py(ys[j]), px(xs[j + 1]), py(ys[j + 1]), colour, width=2)
        if len(xs) == 1:
            _line(image, px(xs[0]) - 2, py(ys[0]), px(xs[0]) + 2, py(ys[0]), colour, width=3)
    if title:
        _text(image, left, 8, title)
    write_png(path, image)


def read_png_size(path: str) -> Tuple[int, int]:
    """(width, height) from a PNG's IHDR (for tests)."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    return struct.unpack(">II", head[16:24])


def moving_average(values: Iterable[float], window: int) -> List[float]:
    """Trailing mean over `window` values (shorter at the start)."""
    values = list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
