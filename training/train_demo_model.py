"""Train the demo text-to-image model on the synthetic shapes world, in diffusers format.

    python -m training.train_demo_model OUT_DIR [--resolution 64] [--vae-steps 3000] [--unet-steps 20000]

Stages (each prints progress; figures go to OUT_DIR/training.json):

1. Autoencoder (`AutoencoderKL`, scale factor 4): reconstruction loss with a
   light KL term, trained until corners stay sharp, since it bounds how well
   shapes can be told apart.
2. Latents of a fixed set of rendered training pictures, cached once.
3. UNet (`UNet2DConditionModel`) and text encoder (`CLIPTextModel`) together,
   noise-prediction loss, about 10% empty captions so classifier-free guidance
   works, EMA of both kept for the saved weights.
4. The pipeline (`StableDiffusionPipeline` with the EMA weights, an Euler
   scheduler and the project's BPE tokenizer over the world's vocabulary) is
   saved as safetensors.

Cost measured on 2026-11-24 on the project's 2-core CPU (2 torch threads): an
autoencoder step (batch 32, 64x64) takes 0.65 s, a denoiser step (batch 64,
5.8M-parameter UNet on 16x16 latents) 1.2 s, so the default budget is a GPU
run; on this CPU, shrink the UNet or the step counts. Generation with the
saved model: 0.49 s for 20 steps at batch 1.

Held-out (colour, shape, background) combinations (`training.shapes.HELD_OUT`)
are never rendered for training. Seeds are fixed: the same command gives the
same model on the same machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from t2i_task.tiny_model import CONTEXT_LENGTH, build_tokenizer
from training.shapes import all_scenes, caption, render, vocabulary

EMPTY_CAPTION_SHARE = 0.1


def log(message: str) -> None:
    print(message, flush=True)


def training_scenes():
    return [scene for scene in all_scenes() if not scene.held_out]


def to_tensor(images) -> torch.Tensor:
    """PIL images -> a batch in [-1, 1], NCHW."""
    import numpy as np

    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def build_models(tokenizer, resolution: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, sample_size=resolution,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=CONTEXT_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=resolution // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
    )
    return vae, text_encoder, unet


def train_autoencoder(vae, scenes, resolution: int, steps: int, batch: int, rng: random.Random) -> list[float]:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    losses = []
    started = time.monotonic()
    for step in range(1, steps + 1):
        images = to_tensor([render(rng.choice(scenes), resolution, rng) for _ in range(batch)])
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % max(1, steps // 20) == 0 or step == steps:
            log(f"  autoencoder {step}/{steps}: loss {sum(losses[-50:]) / len(losses[-50:]):.5f} "
                f"({time.monotonic() - started:.0f}s)")
    return losses


@torch.no_grad()
def cache_latents(vae, scenes, resolution: int, count: int, rng: random.Random, batch: int = 256):
    """Latents (posterior means) and captions of `count` rendered training pictures."""
    latents, pictured = [], []
    for start in range(0, count, batch):
        chosen = [rng.choice(scenes) for _ in range(min(batch, count - start))]
        latents.append(vae.encode(to_tensor([render(scene, resolution, rng) for scene in chosen])).latent_dist.mean)
        pictured.extend(chosen)
    latents = torch.cat(latents)
    scaling = 1.0 / latents.std().item()
    return latents * scaling, pictured, scaling


def train_denoiser(unet, text_encoder, tokenizer, latents, scenes, steps: int, batch: int, rng: random.Random,
                   ema_decay: float = 0.999):
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000)
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=3e-4, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    losses = []
    started = time.monotonic()
    for step in range(1, steps + 1):
        index = torch.randint(0, len(latents), (batch,), generator=generator)
        clean = latents[index]
        captions = ["" if rng.random() < EMPTY_CAPTION_SHARE else caption(scenes[i], rng.randrange(4))
                    for i in index.tolist()]
        tokens = tokenizer(captions, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True,
                           return_tensors="pt").input_ids
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch,), generator=generator)
        noisy = noise_schedule.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=text_encoder(tokens)[0]).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))  # warm-up: early weights are soon forgotten
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for ema_parameter, parameter in zip(ema.parameters(), live.parameters()):
                    ema_parameter.lerp_(parameter, 1 - decay)
        losses.append(loss.item())
        if step % max(1, steps // 40) == 0 or step == steps:
            log(f"  denoiser {step}/{steps}: loss {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                f"({time.monotonic() - started:.0f}s)")
    return ema_unet, ema_text, losses


def save_pipeline(target: Path, vae, text_encoder, unet, tokenizer, scaling: float) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scaling)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="trailing")
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(target, safe_serialization=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", type=Path)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--latents", type=int, default=20000, help="rendered pictures whose latents are cached")
    parser.add_argument("--unet-steps", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    scenes = training_scenes()
    tokenizer = build_tokenizer(vocabulary())
    vae, text_encoder, unet = build_models(tokenizer, args.resolution)
    figures: dict = {"arguments": {k: str(v) for k, v in vars(args).items()}, "training_scenes": len(scenes)}
    started = time.monotonic()

    log(f"[1/4] autoencoder: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters")
    figures["autoencoder_loss"] = train_autoencoder(vae, scenes, args.resolution, args.vae_steps, 32, rng)[-1]
    vae.eval().requires_grad_(False)

    log(f"[2/4] caching latents of {args.latents} pictures")
    latents, pictured, scaling = cache_latents(vae, scenes, args.resolution, args.latents, rng)

    log(f"[3/4] UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M + text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M parameters")
    ema_unet, ema_text, losses = train_denoiser(unet, text_encoder, tokenizer, latents, pictured, args.unet_steps,
                                                args.batch, rng)
    figures["denoiser_loss"] = sum(losses[-100:]) / len(losses[-100:])

    log(f"[4/4] saving to {args.target}")
    save_pipeline(args.target, vae, ema_text, ema_unet, tokenizer, scaling)
    figures["seconds"] = round(time.monotonic() - started, 1)
    figures["torch_threads"] = torch.get_num_threads()
    (args.target / "training.json").write_text(json.dumps(figures, indent=2) + "\n")
    log(f"done in {figures['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
