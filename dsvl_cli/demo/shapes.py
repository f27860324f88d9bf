"""Scenes of the synthetic shapes task: one or two coloured shapes drawn with PIL.

Within a scene the shape types and the colours are distinct, so "the square" or "the red shape"
names exactly one shape. Each shape fills about three quarters of its own quadrant of the image
(random quadrants), apart from the other shape and from the edge. Pixels are exact (no
anti-aliasing), so the recorded boxes can be checked against the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from random import Random
from typing import Any

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 0, 0),
    "green": (0, 170, 0),
    "blue": (0, 0, 230),
    "yellow": (255, 215, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND = (240, 240, 240)


@dataclass(frozen=True)
class Shape:
    """One drawn shape; `box` is (x0, y0, x1, y1) in pixels, inclusive."""

    kind: str
    colour: str
    box: tuple[int, int, int, int]

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.kind, "colour": self.colour, "box": list(self.box)}


Scene = tuple[Shape, ...]


def _layout(rng: Random, size: int, count: int) -> list[tuple[int, int, int, int]]:
    """Boxes for `count` shapes, each inside its own quadrant (distinct quadrants, random).

    A quadrant is `size // 2` pixels square, so with a vision patch of that size every shape lies
    in exactly one patch: a patch token sees a whole shape and nothing else.
    """
    slot = size // 2
    side = round(slot * 0.75)
    # Small jitter keeps a margin inside the quadrant, so shapes never touch each other or the edge.
    jitter = max(0, min(size // 32, (slot - side) // 2 - 1))
    boxes = []
    for quadrant in rng.sample(range(4), count):
        cx = slot * (quadrant % 2) + slot // 2 + rng.randint(-jitter, jitter)
        cy = slot * (quadrant // 2) + slot // 2 + rng.randint(-jitter, jitter)
        x0, y0 = cx - side // 2, cy - side // 2
        boxes.append((x0, y0, x0 + side - 1, y0 + side - 1))
    return boxes


def random_scene(rng: Random, size: int, exclude: tuple[str, str] | None = None) -> Scene:
    """Draw 1-2 shapes with distinct types and colours, each in its own quadrant.

    Args:
        rng: the generator's random source.
        size: image side in pixels.
        exclude: a (colour, shape) pair the scene must not contain.
    """
    count = rng.choice((1, 2))
    kinds = rng.sample(SHAPES, count)
    colours = rng.sample(list(COLOURS), count)
    pairs = list(zip(colours, kinds, strict=True))
    if exclude is not None and exclude in pairs:
        free = [c for c in COLOURS if c not in colours]
        pairs[pairs.index(exclude)] = (rng.choice(free), exclude[1])
    rng.shuffle(pairs)
    boxes = _layout(rng, size, count)
    return tuple(Shape(kind, colour, box) for (colour, kind), box in zip(pairs, boxes, strict=True))


def describe(scene: Scene) -> str:
    """The scene in words, colours in `COLOURS` order: "a red square and a blue circle".

    Colour order rather than left-to-right: the order is then a fact about the objects, not a
    spatial skill on top of the task.
    """
    rank = {colour: index for index, colour in enumerate(COLOURS)}
    ordered = sorted(scene, key=lambda shape: rank[shape.colour])
    return " and ".join(f"a {shape.colour} {shape.kind}" for shape in ordered)


def draw_scene(scene: Scene, size: int) -> Image.Image:
    """Render a scene as an RGB image (no anti-aliasing: shape pixels have the exact colour)."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in scene:
        fill = COLOURS[shape.colour]
        x0, y0, x1, y1 = shape.box
        if shape.kind == "circle":
            draw.ellipse(shape.box, fill=fill)
        elif shape.kind == "square":
            draw.rectangle(shape.box, fill=fill)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image
