"""The demo model's synthetic world: one shape of one colour on a background of another.

A `Scene` says what is in a picture; `render` draws it with PIL and `caption`
describes it in one of several phrasings. Training draws (scene, caption)
pairs from here; the tests' judge reads pictures back into scenes.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 225, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (135, 45, 175),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
# Shapes the base models never saw: adapters teach them (training/train_adapter.py).
NEW_SHAPES = ("ring", "star")
STAR_INNER = 0.45  # a five-pointed star's inner radius over its outer one (0.38: a pentagram's)
RING_HOLE = 0.55  # a ring's hole's radius over its outer one: it fills 70% of its convex hull
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")

# Shape extent as a share of the picture's side, by size word (None: unspecified, medium).
EXTENT = {"small": 0.28, None: 0.42, "large": 0.62}
# Where the shape's centre goes, as a share of the side, by position word.
CENTRE = {
    None: (0.5, 0.5), "center": (0.5, 0.5),
    "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
}

# (colour, shape, background) combinations never shown in training: accuracy on
# them measures whether the model composes words rather than memorising pictures.
HELD_OUT = frozenset({
    ("red", "triangle", "green"),
    ("blue", "circle", "yellow"),
    ("white", "square", "purple"),
    ("orange", "circle", "black"),
    ("green", "square", "white"),
    ("purple", "triangle", "orange"),
})


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    position: str | None = None
    size: str | None = None

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape, self.background) in HELD_OUT


def all_scenes(shapes: tuple[str, ...] = SHAPES) -> list[Scene]:
    """Every scene the vocabulary can describe (with `shapes`: of those shapes)."""
    return [
        Scene(colour, shape, background, position, size)
        for colour, shape, background, position, size in itertools.product(
            COLOURS, shapes, COLOURS, (None, *POSITIONS), (None, *SIZES)
        )
        if colour != background
    ]


def render(scene: Scene, resolution: int = 64, jitter: random.Random | None = None) -> Image.Image:
    """Draw the scene; `jitter` moves and scales the shape a little, for training variety."""
    image = Image.new("RGB", (resolution, resolution), COLOURS[scene.background])
    extent = EXTENT[scene.size] * resolution
    cx, cy = (share * resolution for share in CENTRE[scene.position])
    if jitter is not None:
        extent *= jitter.uniform(0.9, 1.1)
        cx += jitter.uniform(-0.04, 0.04) * resolution
        cy += jitter.uniform(-0.04, 0.04) * resolution
    half = extent / 2
    # Whole shapes only: a large one on the left moves right until it fits, a margin
    # of 1/32 of the side from the edge (the same share at every resolution).
    margin = resolution / 32
    cx, cy = (min(max(c, half + margin), resolution - half - margin) for c in (cx, cy))
    box = (cx - half, cy - half, cx + half, cy + half)
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    elif scene.shape == "ring":  # a disc with a hole of the background's colour
        hole = half * RING_HOLE
        draw.ellipse(box, fill=fill)
        draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=COLOURS[scene.background])
    elif scene.shape == "star":  # five points, one up, its outer radius half the box
        draw.polygon(star_points(cx, cy, half), fill=fill)
    else:  # an upright triangle filling the box
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image


def star_points(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """A five-pointed star's ten corners, its top point up."""
    corners = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * STAR_INNER
        angle = math.pi * k / 5 - math.pi / 2
        corners.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return corners


PHRASINGS = (
    "a {size}{colour} {shape}{place} on a {background} background",
    "{size}{colour} {shape}{place}, {background} background",
    "a picture of a {size}{colour} {shape}{place} on {background}",
    "{background} background with a {size}{colour} {shape}{place}",
)
PLACES = {
    None: "", "center": " in the center", "left": " on the left", "right": " on the right",
    "top": " at the top", "bottom": " at the bottom",
}


def caption(scene: Scene, phrasing: int = 0) -> str:
    return PHRASINGS[phrasing % len(PHRASINGS)].format(
        size=f"{scene.size} " if scene.size else "",
        colour=scene.colour,
        shape=scene.shape,
        place=PLACES[scene.position],
        background=scene.background,
    )


def vocabulary() -> list[str]:
    """Every word a caption can use: the tokenizer gives each its own token."""
    return sorted({
        word for scene in all_scenes() for phrasing in range(len(PHRASINGS))
        for word in caption(scene, phrasing).replace(",", " ").split()
    })
