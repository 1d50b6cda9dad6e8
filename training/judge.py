"""A deterministic judge: what a picture of the demo world shows (colours, shape, position, size).

It reads the background from the border and the foreground from the pixels
farthest from it, names colours by the nearest palette entry, takes as the shape's pixels
those nearer the foreground colour than the background's (the midpoint of a
soft edge), and tells shapes apart by features that survive a little blur: a
triangle is much narrower at the top than at the bottom; of square and circle,
the one whose outline, drawn in the same bounding box, overlaps the pixels best
(intersection over union). A threshold on how much of the box is filled, the
first version, read squares with slightly rounded corners as circles.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from training.shapes import COLOURS, Scene

PALETTE_NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[name] for name in PALETTE_NAMES], dtype=np.float32)


def nearest_colour(rgb: np.ndarray) -> str:
    return PALETTE_NAMES[int(np.argmin(((PALETTE - rgb) ** 2).sum(axis=1)))]


def outlines(x0: int, x1: int, y0: int, y1: int, side_x: int, side_y: int) -> dict[str, np.ndarray]:
    """Each shape as `render` draws it, filling the box [x0, x1) x [y0, y1), as pixel masks."""
    y, x = np.mgrid[0:side_y, 0:side_x] + 0.5  # pixel centres
    cx, cy, half_w, half_h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    inside = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    return {
        "square": inside,
        "circle": ((x - cx) / half_w) ** 2 + ((y - cy) / half_h) ** 2 <= 1,
        "triangle": inside & (np.abs(x - cx) <= (y - y0) / (y1 - y0) * half_w),  # apex up
    }


def best_outline(mask: np.ndarray, x0: int, x1: int, y0: int, y1: int) -> str:
    """Triangle when the shape is much narrower in its top third than in its bottom third
    (blur cuts off a small triangle's apex but keeps that), else the better overlap of
    square and circle."""
    rows = mask[y0:y1, x0:x1].sum(axis=1)
    third = max(1, len(rows) // 3)
    if rows[:third].mean() < 0.6 * rows[-third:].mean():
        return "triangle"

    def overlap(outline: np.ndarray) -> float:
        return (mask & outline).sum() / (mask | outline).sum()

    candidates = outlines(x0, x1, y0, y1, mask.shape[1], mask.shape[0])
    return max(("square", "circle"), key=lambda name: overlap(candidates[name]))


def judge(image: Image.Image) -> Scene:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    distance = np.sqrt(((pixels - background_rgb) ** 2).sum(axis=2))
    mask = distance > 60
    if mask.sum() < 4:  # nothing drawn
        return Scene(colour="none", shape="none", background=nearest_colour(background_rgb))

    # The shape's core, the pixels farthest from the background: blurred edges mix both colours.
    foreground_rgb = np.median(pixels[distance >= max(60, 0.7 * distance.max())], axis=0)
    mask = ((pixels - foreground_rgb) ** 2).sum(axis=2) < ((pixels - background_rgb) ** 2).sum(axis=2)
    if mask.sum() < 4:
        mask = distance > 60
    ys, xs = np.nonzero(mask)
    shape = best_outline(mask, xs.min(), xs.max() + 1, ys.min(), ys.max() + 1)

    # Position by the bounding box's centre (a triangle's mass sits low in its box).
    cx = (xs.min() + xs.max() + 1) / 2 / width
    cy = (ys.min() + ys.max() + 1) / 2 / height
    offsets = {"left": 0.5 - cx, "right": cx - 0.5, "top": 0.5 - cy, "bottom": cy - 0.5}
    side, offset = max(offsets.items(), key=lambda item: item[1])
    position = side if offset > 0.12 else "center"

    extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / width
    size = "small" if extent < 0.35 else "large" if extent > 0.52 else None
    return Scene(nearest_colour(foreground_rgb), shape, nearest_colour(background_rgb), position, size)


ATTRIBUTES = ("colour", "background", "shape", "position", "size")


def score(pairs) -> dict[str, dict[str, float | int]]:
    """Accuracy per attribute over (asked-for scene, judged scene) pairs.

    Position and size count only where the prompt asked for them: unasked, any
    place and size is right.
    """
    results = {}
    for attribute in ATTRIBUTES:
        asked = [(wanted, seen) for wanted, seen in pairs if getattr(wanted, attribute) is not None]
        right = sum(getattr(wanted, attribute) == getattr(seen, attribute) for wanted, seen in asked)
        results[attribute] = {"accuracy": round(100 * right / len(asked), 1) if asked else None, "images": len(asked)}
    return results
