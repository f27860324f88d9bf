"""Scenes of the synthetic shapes task: one or two coloured shapes drawn with PIL.

Within a scene the shape types and the colours are distinct, so "the square" or "the red shape"
names exactly one shape. Two shapes stand side by side (left, right), well apart from each other
and from the edge; one shape is larger and centred. Pixels are exact (no anti-aliasing), so the
recorded boxes can be checked against the image.
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
    """Boxes for `count` shapes: one large centred shape, or two side by side (left, right)."""
    slot = size if count == 1 else size // 2
    side = round(size * (0.6 if count == 1 else 0.4))
    # Small jitter keeps a margin inside the slot, so shapes never touch each other or the edge.
    jitter = max(0, min(size // 16, (slot - side) // 2 - 1))
    boxes = []
    for index in range(count):
        cx = slot * index + slot // 2 + rng.randint(-jitter, jitter)
        cy = size // 2 + rng.randint(-jitter, jitter)
        x0, y0 = cx - side // 2, cy - side // 2
        boxes.append((x0, y0, x0 + side - 1, y0 + side - 1))
    return boxes


def random_scene(rng: Random, size: int, exclude: tuple[str, str] | None = None) -> Scene:
    """Draw 1-2 shapes with distinct types and colours, listed left to right.

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
    """The scene in words, left to right: "a red square and a blue circle"."""
    ordered = sorted(scene, key=lambda shape: shape.box[0])
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
