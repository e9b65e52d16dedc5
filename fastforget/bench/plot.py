"""Grouped bar charts as PNG files, drawn with PIL (no plotting library needed)."""
from __future__ import annotations

PALETTE = [(40, 90, 220), (220, 60, 40), (40, 160, 90), (150, 80, 200), (230, 150, 30), (90, 90, 90)]


def bars(groups: dict[str, dict[str, float]], title: str, unit: str, path: str, bar_w: int = 26,
         height: int = 360, margin: int = 60) -> None:
    """groups: label -> {series name: value}; one bar per series in every group, a value printed on
    each bar; groups are numbered under the axis and listed with their labels below, beside the
    series legend. NaN values (skipped providers) draw no bar."""
    from PIL import Image, ImageDraw

    series = list(dict.fromkeys(name for values in groups.values() for name in values))
    values = [v for g in groups.values() for v in g.values() if v == v]
    top = max(values, default=1.0) * 1.1 or 1.0
    group_w = bar_w * len(series) + 24
    width = max(2 * margin + group_w * len(groups), 420)
    img = Image.new("RGB", (width, height + 24 + 16 * max(len(series), len(groups))), "white")
    g = ImageDraw.Draw(img)
    g.text((margin, 10), title, fill=(0, 0, 0))
    base = height - margin
    g.line([margin, base, width - margin // 2, base], fill=(120, 120, 120))
    for k in range(5):
        y = base - (height - 2 * margin) * k / 4
        g.text((6, y - 6), _short(top * k / 4), fill=(0, 0, 0))
    g.text((6, margin - 24), unit, fill=(0, 0, 0))
    for i, (label, group) in enumerate(groups.items()):
        x0 = margin + 12 + i * group_w
        for j, name in enumerate(series):
            v = group.get(name, float("nan"))
            if v != v:
                continue
            y = base - (height - 2 * margin) * v / top
            g.rectangle([x0 + j * bar_w, y, x0 + (j + 1) * bar_w - 3, base], fill=PALETTE[j % len(PALETTE)])
            g.text((x0 + j * bar_w, y - 12), _short(v), fill=(0, 0, 0))
        g.text((x0, base + 6), str(i + 1), fill=(0, 0, 0))
        g.text((margin + 180, height + 16 * i - 1), f"{i + 1}: {label}", fill=(0, 0, 0))
    for j, name in enumerate(series):
        y = height + 16 * j
        g.rectangle([margin, y, margin + 10, y + 10], fill=PALETTE[j % len(PALETTE)])
        g.text((margin + 16, y - 1), name, fill=(0, 0, 0))
    img.save(path)


def _short(v: float) -> str:
    """At most four characters for the usual magnitudes: 5013, 86.3, 0.62."""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2g}"
