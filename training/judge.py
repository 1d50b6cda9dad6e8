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


STAR_SOLIDITY = 0.75  # a star fills less than this share of its convex hull; the other shapes nearly all


def convex_hull_area(mask: np.ndarray) -> float:
    """The area of the convex hull of the mask's pixels (as unit squares)."""
    ys, xs = np.nonzero(mask)
    corners = np.unique(np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)]),
                        axis=0)
    if len(corners) < 3:
        return float(mask.sum())
    points = sorted(map(tuple, corners.tolist()))

    def cross(o, a, b) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(ordered):  # Andrew's monotone chain
        chain = []
        for point in ordered:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], point) <= 0:
                chain.pop()
            chain.append(point)
        return chain[:-1]

    hull = half(points) + half(points[::-1])
    x, y = np.array([p[0] for p in hull], dtype=float), np.array([p[1] for p in hull], dtype=float)
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def solidity(mask: np.ndarray) -> float:
    """The mask's area over its convex hull's: about 1 for a circle, square or triangle, 0.5-0.7 for a star."""
    return float(mask.sum()) / max(1.0, convex_hull_area(mask))


def has_hole(mask: np.ndarray) -> bool:
    """Whether background pixels lie enclosed by the shape (not reachable from the picture's border)."""
    free = ~mask
    reached = np.zeros_like(mask)
    reached[0, :], reached[-1, :], reached[:, 0], reached[:, -1] = free[0, :], free[-1, :], free[:, 0], free[:, -1]
    while True:
        grown = reached.copy()
        grown[1:, :] |= reached[:-1, :]
        grown[:-1, :] |= reached[1:, :]
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        grown &= free
        if (grown == reached).all():
            return bool((free & ~reached).sum() >= 2)
        reached = grown


def best_outline(mask: np.ndarray, x0: int, x1: int, y0: int, y1: int) -> str:
    """Ring or star when the shape fills less than STAR_SOLIDITY of its convex hull (a ring when it
    encloses background, a hole); triangle when it is
    much narrower in its top third than in its bottom third (blur cuts off a small triangle's apex
    but keeps that), else the better overlap of square and circle."""
    if solidity(mask) < STAR_SOLIDITY:
        return "ring" if has_hole(mask) else "star"
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
