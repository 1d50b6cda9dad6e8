"""Which size a model draws for the size a client asks: one policy for every API.

A diffusion model draws well only near the size it was trained at. Each served
model declares that size and the range of sides it draws well (`model.sizes`
in configuration.yaml). A size inside the range is drawn as asked; any other,
up to the configured maximum (`limits.max_width` / `max_height`), is drawn at
the nearest size inside the range with the same aspect ratio (each side rounded
to the model's multiple) and resized, with Lanczos, to exactly the size asked.
The cost limit and the scheduler count the drawn size, never the asked one.
"""

from __future__ import annotations

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator


class DrawnSizes(BaseModel):
    """The sizes a model draws well (its configuration)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    native: int = Field(ge=8, description="The side it was trained at: the size of `size: auto`.")
    min: int = Field(ge=8, description="The smallest side it draws well.")
    max: int = Field(ge=8, description="The largest side it draws well.")
    multiple: int = Field(default=8, ge=1, description="Every drawn side is a multiple of this (the VAE's factor).")

    @model_validator(mode="after")
    def _ordered(self) -> DrawnSizes:
        if not self.min <= self.native <= self.max:
            raise ValueError(f"sizes: min <= native <= max, got {self.min}, {self.native}, {self.max}")
        if self.min % self.multiple or self.max % self.multiple or self.native % self.multiple:
            raise ValueError(f"sizes: native, min and max must be multiples of {self.multiple}")
        return self

    def drawn(self, width: int, height: int) -> tuple[int, int]:
        """The size the model draws for `width` x `height`."""
        if self.min <= width <= self.max and self.min <= height <= self.max:
            return width, height
        if max(width, height) > self.max:
            scale = self.max / max(width, height)
        else:
            scale = self.min / min(width, height)
        return self._fit(width * scale), self._fit(height * scale)

    def _fit(self, side: float) -> int:
        # A very long or very tall asked size cannot keep its ratio inside the range: it is clamped.
        return min(self.max, max(self.min, round(side / self.multiple) * self.multiple))


def resized(image: Image.Image, width: int, height: int) -> Image.Image:
    """The drawn image at the asked size (itself if it is that size already)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)
