"""A deterministic judge: what a picture of the demo world shows (colours, shape, position, size).

It reads the background from the border, the foreground from the pixels far
from it, names colours by the nearest palette entry, and tells shapes apart by
how much of their bounding box they fill (square ~1, circle ~0.79, triangle ~0.5).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from training.shapes import COLOURS, Scene

PALETTE_NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[name] for name in PALETTE_NAMES], dtype=np.float32)


def nearest_colour(rgb: np.ndarray) -> str:
    return PALETTE_NAMES[int(np.argmin(((PALETTE - rgb) ** 2).sum(axis=1)))]


def judge(image: Image.Image) -> Scene:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    distance = np.sqrt(((pixels - background_rgb) ** 2).sum(axis=2))
    mask = distance > 60
    if mask.sum() < 4:  # nothing drawn
        return Scene(colour="none", shape="none", background=nearest_colour(background_rgb))

    foreground_rgb = np.median(pixels[mask], axis=0)
    ys, xs = np.nonzero(mask)
    box_area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = mask.sum() / box_area
    shape = "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"

    # Position by the bounding box's centre (a triangle's mass sits low in its box).
    cx = (xs.min() + xs.max() + 1) / 2 / width
    cy = (ys.min() + ys.max() + 1) / 2 / height
    offsets = {"left": 0.5 - cx, "right": cx - 0.5, "top": 0.5 - cy, "bottom": cy - 0.5}
    side, offset = max(offsets.items(), key=lambda item: item[1])
    position = side if offset > 0.12 else "center"

    extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / width
    size = "small" if extent < 0.35 else "large" if extent > 0.52 else None
    return Scene(nearest_colour(foreground_rgb), shape, nearest_colour(background_rgb), position, size)
