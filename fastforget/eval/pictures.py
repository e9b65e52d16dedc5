"""Image grids that explain themselves: each row named at its left, each group of columns named
above it, a title on top. The demo's reconstructions and eval's grids are drawn with it."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

GAP = 3  # pixels between images
GROUP_GAP = 14  # and between column groups
INK, MUTED = (0, 0, 0), (90, 90, 90)


def font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def _to_pil(image: Tensor, side: int):
    """(C, H, W) in [0, 1] -> an RGB PIL image side pixels tall, pixels kept sharp."""
    from PIL import Image

    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    img = Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), "RGB")
    width = round(side * img.width / img.height)
    return img.resize((width, side), Image.NEAREST)


def save_grid(path: str, rows: Sequence[tuple[str, Tensor]], groups: Sequence[tuple[str, int]],
              title: Optional[str] = None, side: int = 64) -> None:
    """rows: (label, images (N, C, H, W) in [0, 1]), every row with the same N; groups: (label,
    number of columns) from the left, covering N; title above everything. Written as a PNG."""
    from PIL import Image, ImageDraw

    count = rows[0][1].shape[0]
    if any(images.shape[0] != count for _, images in rows) or sum(n for _, n in groups) != count:
        raise ValueError(f"every row needs the groups' {sum(n for _, n in groups)} images")
    label_font, head_font = font(13), font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 12 + max(int(probe.textlength(label, font=label_font)) for label, _ in rows)
    cells = [[_to_pil(img, side) for img in images] for _, images in rows]
    cell_w = cells[0][0].width
    top = 8 + (24 if title else 0) + 26
    width = label_w + count * (cell_w + GAP) + GROUP_GAP * (len(groups) - 1) + 8
    height = top + len(rows) * (side + GAP) + 6
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((8, 8), title, fill=INK, font=head_font)

    def column_x(k: int) -> int:  # left edge of column k, past the gaps of the groups before it
        before = 0
        for g, (_, n) in enumerate(groups):
            before += n
            if k < before:
                return label_w + k * (cell_w + GAP) + g * GROUP_GAP
        raise IndexError(k)

    first = 0
    for label, n in groups:  # a group's name over a rule spanning its columns
        x0, x1 = column_x(first), column_x(first + n - 1) + cell_w
        draw.text((x0, top - 24), label, fill=INK, font=head_font)
        draw.line([x0, top - 6, x1, top - 6], fill=MUTED, width=2)
        first += n
    for r, (label, _) in enumerate(rows):
        y = top + r * (side + GAP)
        draw.text((6, y + side // 2 - 8), label, fill=INK, font=label_font)
        for k, cell in enumerate(cells[r]):
            canvas.paste(cell, (column_x(k), y))
    canvas.save(path)


COLOURS = ((220, 60, 40), (40, 90, 220), (30, 150, 70), (150, 60, 180))


def scatter(series: dict, x_label: str, y_label: str, path: str, connect: bool = False,
            lines: Sequence[tuple[str, float]] = (), size=(560, 400), margin=56) -> None:
    """A labelled scatter plot with PIL: series = {name: [(x, y, label), ...]}, one colour each
    (connected in order with connect); lines: ("x" or "y", value) dashed reference lines (goals)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    g = ImageDraw.Draw(img)
    xs = [p[0] for pts in series.values() for p in pts] + [v for axis, v in lines if axis == "x"]
    ys = [p[1] for pts in series.values() for p in pts] + [v for axis, v in lines if axis == "y"]
    x_lo, x_hi = min(xs) * 0.95, max(xs) * 1.05 + 1e-9
    y_pad = 0.05 * (max(ys) - min(ys) or 1)
    y_lo, y_hi = min(ys) - y_pad, max(ys) + y_pad
    w, h = size[0] - 2 * margin, size[1] - 2 * margin

    def at(x, y):
        return margin + (x - x_lo) / (x_hi - x_lo) * w, size[1] - margin - (y - y_lo) / (y_hi - y_lo + 1e-9) * h

    g.rectangle([margin, margin, margin + w, margin + h], outline=(150, 150, 150))
    for k in range(5):
        x = x_lo + (x_hi - x_lo) * k / 4
        y = y_lo + (y_hi - y_lo) * k / 4
        g.text((at(x, y_lo)[0] - 10, size[1] - margin + 6), f"{x:.2f}", fill=(0, 0, 0))
        g.text((8, at(x_lo, y)[1] - 6), f"{y:.2f}", fill=(0, 0, 0))
    g.text((margin + w // 2 - 3 * len(x_label), size[1] - 22), x_label, fill=(0, 0, 0))
    g.text((margin, 18), y_label, fill=(0, 0, 0))
    for axis, value in lines:
        a, b = (at(value, y_lo), at(value, y_hi)) if axis == "x" else (at(x_lo, value), at(x_hi, value))
        steps = 40
        for k in range(0, steps, 2):
            g.line([a[0] + (b[0] - a[0]) * k / steps, a[1] + (b[1] - a[1]) * k / steps,
                    a[0] + (b[0] - a[0]) * (k + 1) / steps, a[1] + (b[1] - a[1]) * (k + 1) / steps],
                   fill=(160, 160, 160))
    for i, (name, points) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        if connect and len(points) > 1:
            g.line([at(x, y) for x, y, _ in points], fill=colour, width=2)
        for x, y, label in points:
            px, py = at(x, y)
            g.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
            g.text((px + 6, py - 14), label, fill=colour)
        lx, ly = size[0] - 130, 6 + 14 * i  # above the plot, right of the y label
        g.ellipse([lx, ly + 2, lx + 7, ly + 9], fill=colour)
        g.text((lx + 12, ly), name, fill=colour)
    img.save(path)
