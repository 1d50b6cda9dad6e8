"""Partial images: what a running call's latents look like part-way through, decoded by the VAE.

OpenAI's streaming `partial_images` (1 to 3) asks for previews while an image is being drawn.
A preview here is the pipeline's current latents after a chosen denoising step, decoded as the
final image is: still noisy early on, sharper as the steps go. Decoding reads the latents and
changes nothing, so the call goes on exactly as without previews.
"""

from __future__ import annotations

import math

import torch
from PIL import Image

MAX_PARTIAL_IMAGES = 3


def preview_steps(total_steps: int, count: int) -> set[int]:
    """The steps (1-based) after which to decode a preview: `count` of them spread evenly before
    the last step, fewer when the call has too few steps to spread them over."""
    return {math.ceil(total_steps * (i + 1) / (count + 1)) for i in range(count)} - {total_steps, 0}


def decode_latents(pipeline, latents: torch.Tensor) -> list[Image.Image]:
    """RGB images of these latents, decoded the way a Stable Diffusion pipeline decodes its output."""
    vae = pipeline.vae
    scaled = latents.to(vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        scaled = scaled + shift
    decoded = vae.decode(scaled, return_dict=False)[0]
    return pipeline.image_processor.postprocess(decoded, output_type="pil")
