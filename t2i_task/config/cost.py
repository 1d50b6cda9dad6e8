"""What a generation costs on this machine, and the largest ones that finish in time.

A denoising step's work grows with its pixels, so one image costs about
`overhead_s + seconds_per_megapixel_step x megapixels x steps`, and a request
of N images N times that (images are counted one after another: batching only
makes them cheaper). `make calibrate` measures the two figures for the served
model on the serving machine (t2i_task/generation/calibrate.py) and stores them with the
model's settings (`model.cost` in configuration.yaml).

The server uses the figure twice: a request that cannot finish within the time
a model call may take is refused at submission, naming the largest size and
step count that would (settings.py); and the scheduler hands the model no more
work than it can finish within that time (t2i_task/jobs/scheduler.py).
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

# Share of a model call's time limit that estimated work may fill: the figure is a
# straight-line fit, and a machine busier than when it was measured runs slower.
HEADROOM = 0.8
MEGAPIXEL = 1_000_000


class GenerationCost(BaseModel):
    """Seconds one image takes on the serving machine, as measured by `make calibrate`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    overhead_s: float = Field(ge=0, description="Seconds per image whatever its size: text encoding, decoding, copying.")
    seconds_per_megapixel_step: float = Field(gt=0, description="Seconds one denoising step takes per million pixels.")
    measured_on: str | None = Field(default=None, description="Where and when: the figures hold for that machine.")

    def seconds(self, width: int, height: int, steps: int, images: int = 1) -> float:
        """Estimated seconds for `images` images of `width` x `height` at `steps` steps."""
        per_image = self.overhead_s + self.seconds_per_megapixel_step * width * height / MEGAPIXEL * steps
        return images * per_image

    def max_pixels(self, steps: int, images: int, budget_s: float) -> int:
        """The most pixels per image at `steps` steps and `images` images within `budget_s` (0: none)."""
        spare = budget_s / images - self.overhead_s
        return max(0, math.floor(spare / (self.seconds_per_megapixel_step * steps) * MEGAPIXEL))

    def max_steps(self, width: int, height: int, images: int, budget_s: float) -> int:
        """The most steps for `images` images of `width` x `height` within `budget_s` (0: none)."""
        spare = budget_s / images - self.overhead_s
        return max(0, math.floor(spare / (self.seconds_per_megapixel_step * width * height / MEGAPIXEL)))


def largest_square(max_pixels: int, multiple: int = 8) -> int:
    """The side of the largest square image, a multiple of `multiple`, with at most `max_pixels` pixels."""
    return math.isqrt(max_pixels) // multiple * multiple
