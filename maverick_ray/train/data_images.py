"""Synthetic, text-free scenes drawn with Pillow, and questions about them.

A scene is a few filled shapes (circle, square, triangle, star) of named colours on a light
background. The same scene object gives the picture, a sentence describing it (for text-only
"scene facts" chats) and question/answer pairs with short, formulaic answers ("circle", "red",
"3", "left"). Everything is drawn from a `random.Random`, so a seed fixes the data.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (215, 35, 35), "green": (35, 155, 60), "blue": (35, 75, 215),
           "yellow": (235, 200, 25), "purple": (135, 55, 175), "orange": (245, 135, 25)}
PLACES = ("left", "right", "top", "bottom", "center")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    cx: float   # centre, as a fraction of the width / height
    cy: float
    r: float    # radius as a fraction of the side


@dataclass(frozen=True)
class Scene:
    items: tuple[Item, ...]
    background: tuple[int, int, int]


def _place(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < 0.12:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def place_of(item: Item) -> str:
    return _place(item.cx, item.cy)


def _background(rng: random.Random) -> tuple[int, int, int]:
    v = rng.randint(225, 255)
    return (v, v - rng.randint(0, 10), v - rng.randint(0, 10))


def single_scene(rng: random.Random) -> Scene:
    """One shape somewhere in the picture."""
    r = rng.uniform(0.16, 0.3)
    place = rng.choice(PLACES)
    off = rng.uniform(0.22, 0.5 - r) if 0.5 - r > 0.22 else 0.5 - r
    cx, cy = {"left": (0.5 - off, 0.5), "right": (0.5 + off, 0.5), "top": (0.5, 0.5 - off),
              "bottom": (0.5, 0.5 + off), "center": (0.5, 0.5)}[place]
    cx += rng.uniform(-0.05, 0.05) if place in ("top", "bottom", "center") else 0
    cy += rng.uniform(-0.05, 0.05) if place in ("left", "right", "center") else 0
    return Scene((Item(rng.choice(SHAPES), rng.choice(list(COLOURS)), cx, cy, r),), _background(rng))


def count_scene(rng: random.Random) -> Scene:
    """2-4 copies of one shape and colour in the cells of a 2x2 grid (counts of one come from
    single scenes, whose position is unambiguous)."""
    n = rng.randint(2, 4)
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    cells = rng.sample([(0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73)], n)
    items = tuple(Item(shape, colour, x + rng.uniform(-0.04, 0.04), y + rng.uniform(-0.04, 0.04),
                       rng.uniform(0.12, 0.19)) for x, y in cells)
    return Scene(items, _background(rng))


def random_scene(rng: random.Random, counted: float = 0.25) -> Scene:
    """A count scene with probability `counted`, else a single shape (the pictures' mix)."""
    return count_scene(rng) if rng.random() < counted else single_scene(rng)


def _polygon(item: Item, size: int) -> list[tuple[float, float]]:
    cx, cy, r = item.cx * size, item.cy * size, item.r * size
    if item.shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if item.shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    pts = []  # star: 5 points
    for k in range(10):
        a = -math.pi / 2 + k * math.pi / 5
        rad = r if k % 2 == 0 else r * 0.45
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def render(scene: Scene, size: int = 64, jitter: random.Random | None = None):
    """The scene as an RGB PIL image of size x size pixels (colours jittered when given an rng)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(img)
    for item in scene.items:
        rgb = COLOURS[item.colour]
        if jitter is not None:
            rgb = tuple(max(0, min(255, c + jitter.randint(-18, 18))) for c in rgb)
        if item.shape == "circle":
            cx, cy, r = item.cx * size, item.cy * size, item.r * size
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        else:
            draw.polygon(_polygon(item, size), fill=rgb)
    return img


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def describe(scene: Scene) -> str:
    """A sentence stating the scene's facts, e.g. "The picture shows a red circle on the left."."""
    if len(scene.items) == 1:
        it = scene.items[0]
        where = {"center": "in the center", "top": "at the top", "bottom": "at the bottom"}.get(
            place_of(it), f"on the {place_of(it)}")
        return f"The picture shows a {it.colour} {it.shape} {where}."
    it, n = scene.items[0], len(scene.items)
    return f"The picture shows {NUMBER_WORDS[n]} {it.colour} {it.shape}s."


SHAPE_QUESTIONS = ("What shape is in the image?", "What shape is this?", "Which shape do you see?")
COLOUR_QUESTIONS = ("What colour is the shape?", "What color is the shape?", "Which colour is it?")


def questions(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair about the scene."""
    it = scene.items[0]
    if len(scene.items) > 1 or rng.random() < 0.1:
        kind = rng.choice(("count", "count_named", "shape", "colour"))
    else:
        kind = rng.choice(("shape", "colour", "describe", "where", "shape", "colour"))
    n = len(scene.items)
    if kind == "shape":
        return rng.choice(SHAPE_QUESTIONS), it.shape
    if kind == "colour":
        return rng.choice(COLOUR_QUESTIONS), it.colour
    if kind == "describe":
        return rng.choice(("Describe the image.", "What is in the image?")), f"a {it.colour} {it.shape}"
    if kind == "where":
        return rng.choice((f"Where is the {it.shape}?", "Where is the shape?")), place_of(it)
    if kind == "count":
        return rng.choice(("How many shapes are there?", "How many shapes are in the image?")), str(n)
    return f"How many {it.colour} {it.shape}s are there?", str(n)


def image_example(rng: random.Random, size: int | None = None):
    """(PNG bytes, question, answer) for a new random scene; most pictures are one 64 px tile,
    some larger (several tiles plus the global tile), so other sizes work too."""
    scene = random_scene(rng)
    if size is None:
        size = 64 if rng.random() < 0.9 else rng.choice((48, 96, 128))
    question, answer = questions(scene, rng)
    return png_bytes(render(scene, size, rng)), question, answer
