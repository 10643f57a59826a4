"""Loss curves as a PNG drawn with Pillow (matplotlib is not a dependency)."""

from __future__ import annotations

from pathlib import Path

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def _smooth(ys: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= k:
            acc -= ys[i - k]
        out.append(acc / min(i + 1, k))
    return out


def loss_curve(series: dict[str, list[float]], out: Path, title: str, smooth: int = 20,
               size: tuple[int, int] = (900, 500)) -> Path:
    """One line per named series (smoothed over `smooth` steps) against the step, y from 0."""
    from PIL import Image, ImageDraw

    W, H = size
    left, right, top, bottom = 60, 20, 40, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    n = max(len(v) for v in series.values())
    ymax = max(max(v) for v in series.values() if v) * 1.05
    sx = lambda i: left + (W - left - right) * i / max(1, n - 1)  # noqa: E731
    sy = lambda y: top + (H - top - bottom) * (1 - y / ymax)    # noqa: E731
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for k in range(6):
        y = ymax * k / 5
        d.line([left - 4, sy(y), left, sy(y)], fill="black")
        d.text((5, sy(y) - 6), f"{y:.2f}", fill="black")
        step = int((n - 1) * k / 5)
        d.text((sx(step) - 10, H - bottom + 6), str(step), fill="black")
    d.text((W // 2 - 20, H - 20), "step", fill="black")
    d.text((left, 12), title, fill="black")
    for c, (name, ys) in enumerate(series.items()):
        colour = COLOURS[c % len(COLOURS)]
        pts = [(sx(i), sy(y)) for i, y in enumerate(_smooth(ys, smooth))]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        d.text((W - right - 160, top + 8 + 16 * c), f"-- {name}", fill=colour)
    out = Path(out)
    img.save(out)
    return out
