"""Train the demo text-to-image model on the synthetic shapes world, in diffusers format.

    python -m training.train_demo_model OUT_DIR [--resolution 32] [--vae-steps 3000] [--unet-steps 4500]

Stages (each prints progress; figures go to OUT_DIR/training.json):

1. Autoencoder (`AutoencoderKL`, pictures to 8x8x4 latents): reconstruction
   loss (MSE + L1) with a light KL term, trained until corners stay sharp,
   since it bounds how well shapes can be told apart. The judge then reads 300
   reconstructions: their scores are the ceiling for generated pictures.
   It is saved at once to OUT_DIR/vae; `--autoencoder OUT_DIR` reuses it.
2. Latents of a fixed set of rendered training pictures, cached once.
3. UNet (`UNet2DConditionModel`) and text encoder (`CLIPTextModel`) together,
   noise-prediction loss, about 10% empty captions so classifier-free guidance
   works, EMA of both kept for the saved weights.
4. The pipeline (`StableDiffusionPipeline` with the EMA weights, an Euler
   scheduler and the project's BPE tokenizer over the world's vocabulary) is
   saved as safetensors.

The defaults are what the shipped model (demo_model/) was trained with, on the
project's 2-core CPU; its card has the time each stage took. At 64x64 the
autoencoder needs far more than this CPU's budget: after 2000 steps (20 min)
the judge still read the right shape in only 53% of reconstructions, so the
shipped model is 32x32.

Held-out (colour, shape, background) combinations (`training.shapes.HELD_OUT`)
are never rendered for training. Seeds are fixed: the same command gives the
same model on the same machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from t2i_task.generation.tiny_model import CONTEXT_LENGTH, build_tokenizer
from training.judge import judge, score
from training.shapes import all_scenes, caption, render, vocabulary

EMPTY_CAPTION_SHARE = 0.1
LATENT_SIDE = 8  # latents are 8x8 at every resolution


def log(message: str) -> None:
    print(message, flush=True)


def machine() -> str:
    """What the figures were measured on."""
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def training_scenes():
    return [scene for scene in all_scenes() if not scene.held_out]


def to_tensor(images) -> torch.Tensor:
    """PIL images -> a batch in [-1, 1], NCHW."""
    import numpy as np

    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def build_models(tokenizer, resolution: int, latent_side: int = LATENT_SIDE):
    """The three networks, sized for a CPU budget.

    The autoencoder shrinks pictures to `latent_side` x `latent_side` x 4
    latents (one halving per level past the first). shapes-32 uses 8x8 latents
    (a factor of 4); a 64x64 autoencoder down to the same 8x8 (a factor of 8)
    stayed blurred on this CPU's budget, so shapes-64 keeps the factor of 4 and
    works on 16x16 latents, with one more UNet level (16, 8, 4) so that its
    cross-attention still sits where the latents are 4x4 (and in its middle
    block): measured on the project's 2-core CPU, a training step costs a
    quarter less and a generation step a third less than with attention at
    every level.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    levels = int(math.log2(resolution // latent_side)) + 1
    if resolution != latent_side * 2 ** (levels - 1) or levels < 2:
        raise SystemExit(f"--resolution must be {latent_side}x{latent_side} latents times a power of two "
                         f"(not {resolution})")
    unet_levels = int(math.log2(latent_side // 4))  # down to 4x4, where cross-attention is
    if latent_side != 4 * 2 ** unet_levels or unet_levels < 1:
        raise SystemExit(f"--latent-side must be 8, 16, 32, ... (not {latent_side})")
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(16, 32, 64, 64, 64)[:levels], layers_per_block=1, norm_num_groups=16,
        sample_size=resolution,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=CONTEXT_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=latent_side, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, *(128,) * unet_levels),
        down_block_types=("DownBlock2D",) * unet_levels + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * unet_levels,
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
    )
    return vae, text_encoder, unet


def learning_rate(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Checkpoints:
    """A training stage's whole state, saved every `every` steps to OUT_DIR/checkpoint.pt (replaced
    atomically), so that a run stopped at any point (a session's end, a crash) resumes where it
    stopped when the same command runs again: the models, optimizer, EMA, the random generators'
    states and the losses so far, so the resumed run continues as the uninterrupted one would."""

    def __init__(self, folder: Path, every: int) -> None:
        self.path, self.every = folder / "checkpoint.pt", every
        self.earlier_s, self.started = 0.0, time.monotonic()

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, weights_only=False)
        self.earlier_s = state["seconds"]
        return state

    def seconds(self) -> float:
        """Training time so far, earlier runs included."""
        return round(self.earlier_s + time.monotonic() - self.started, 1)

    def due(self, step: int, steps: int) -> bool:
        return self.every > 0 and step % self.every == 0 and step < steps

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        torch.save(state, partial)
        os.replace(partial, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def random_states(rng: random.Random, generator: torch.Generator | None = None) -> dict:
    return {"rng": rng.getstate(), "torch": torch.get_rng_state(),
            "generator": generator.get_state() if generator is not None else None}


def restore_random_states(states: dict, rng: random.Random, generator: torch.Generator | None = None) -> None:
    rng.setstate(states["rng"])
    torch.set_rng_state(states["torch"])
    if generator is not None:
        generator.set_state(states["generator"])


def train_autoencoder(vae, scenes, resolution: int, steps: int, batch: int, rng: random.Random,
                      checkpoints: Checkpoints, resume: dict | None = None) -> list[float]:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    losses: list[float] = []
    first = 1
    if resume is not None:
        vae.load_state_dict(resume["vae"])
        optimizer.load_state_dict(resume["optimizer"])
        restore_random_states(resume["random"], rng)
        losses, first = resume["losses"], resume["step"] + 1
        log(f"  resuming the autoencoder at step {first}")
    started = time.monotonic()
    for step in range(first, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, 1e-3)
        images = to_tensor([render(rng.choice(scenes), resolution, rng) for _ in range(batch)])
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        # L1 beside MSE keeps edges and corners sharp, which is what tells shapes apart.
        loss = (F.mse_loss(reconstruction, images) + F.l1_loss(reconstruction, images)
                + 1e-6 * posterior.kl().mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % max(1, steps // 20) == 0 or step == steps:
            log(f"  autoencoder {step}/{steps}: loss {statistics.fmean(losses[-50:]):.5f} "
                f"({time.monotonic() - started:.0f}s)")
        if checkpoints.due(step, steps):
            checkpoints.save({"stage": "autoencoder", "step": step, "vae": vae.state_dict(),
                              "optimizer": optimizer.state_dict(), "random": random_states(rng), "losses": losses,
                              "seconds": checkpoints.seconds()})
    return losses


@torch.no_grad()
def judge_reconstructions(vae, resolution: int, count: int, rng: random.Random) -> dict:
    """The judge's accuracy on autoencoded pictures of random scenes: the ceiling for generated ones."""
    from PIL import Image

    chosen = [rng.choice(all_scenes()) for _ in range(count)]
    pictures = to_tensor([render(scene, resolution, rng) for scene in chosen])
    decoded = vae.decode(vae.encode(pictures).latent_dist.mean).sample
    array = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return score([(scene, judge(Image.fromarray(picture))) for scene, picture in zip(chosen, array)])


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
                   checkpoints: Checkpoints, resume: dict | None = None, saved: dict | None = None,
                   ema_decay: float = 0.999, peak_lr: float = 5e-4, noise_offset: float = 0.0):
    """The UNet and text encoder; `saved` is what a checkpoint of this stage must also carry (the
    cached latents and what earlier stages measured), since a resumed run skips those stages.

    `noise_offset` adds that much of one random value per picture and channel to the noise
    (offset noise): at the last noise level the scaled-linear schedule keeps about 7% of the
    picture, and in 16x16 latents the average of each channel (the background's colour) still
    shows through the noise, so a model trained without it learns to read the background from
    the noise and, from pure noise, draws a background its prompt did not ask for."""
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000)
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=peak_lr, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    losses: list[float] = []
    first = 1
    if resume is not None:
        for model, key in ((unet, "unet"), (text_encoder, "text_encoder"), (ema_unet, "ema_unet"),
                           (ema_text, "ema_text")):
            model.load_state_dict(resume[key])
        optimizer.load_state_dict(resume["optimizer"])
        restore_random_states(resume["random"], rng, generator)
        losses, first = resume["losses"], resume["step"] + 1
        log(f"  resuming the denoiser at step {first}")
    started = time.monotonic()
    for step in range(first, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, peak_lr)
        index = torch.randint(0, len(latents), (batch,), generator=generator)
        clean = latents[index]
        captions = ["" if rng.random() < EMPTY_CAPTION_SHARE else caption(scenes[i], rng.randrange(4))
                    for i in index.tolist()]
        tokens = tokenizer(captions, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True,
                           return_tensors="pt").input_ids
        noise = torch.randn(clean.shape, generator=generator)
        if noise_offset:
            noise += noise_offset * torch.randn((*clean.shape[:2], 1, 1), generator=generator)
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
            log(f"  denoiser {step}/{steps}: loss {statistics.fmean(losses[-100:]):.4f} "
                f"({time.monotonic() - started:.0f}s)")
        if checkpoints.due(step, steps):
            checkpoints.save({**(saved or {}), "stage": "denoiser", "step": step, "unet": unet.state_dict(),
                              "text_encoder": text_encoder.state_dict(), "ema_unet": ema_unet.state_dict(),
                              "ema_text": ema_text.state_dict(), "optimizer": optimizer.state_dict(),
                              "random": random_states(rng, generator), "losses": losses,
                              "seconds": checkpoints.seconds()})
    return ema_unet, ema_text, losses


def save_pipeline(target: Path, vae, text_encoder, unet, tokenizer, scaling: float) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scaling)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="trailing")
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    # Stored in half precision, half the bytes in the repository; loaders cast to their own dtype.
    pipeline.to(torch.float16).save_pretrained(target, safe_serialization=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", type=Path)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--autoencoder", type=Path, default=None,
                        help="reuse the autoencoder a previous run saved in DIR/vae instead of training one")
    parser.add_argument("--latents", type=int, default=10000, help="rendered pictures whose latents are cached")
    parser.add_argument("--unet-steps", type=int, default=4500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--latent-side", type=int, default=LATENT_SIDE,
                        help="latents are SIDE x SIDE x 4: 8 for shapes-32, 16 for shapes-64")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from the pipeline saved in DIR (its autoencoder, UNet and text encoder) and "
                             "train its denoiser further")
    parser.add_argument("--noise-offset", type=float, default=0.0, help="offset noise (train_denoiser)")
    parser.add_argument("--lr", type=float, default=5e-4, help="the denoiser's peak learning rate")
    parser.add_argument("--checkpoint-every", type=int, default=100,
                        help="save the stage's state every N steps (0: never); a run finding OUT_DIR/checkpoint.pt "
                             "resumes from it")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    scenes = training_scenes()
    tokenizer = build_tokenizer(vocabulary())
    vae, text_encoder, unet = build_models(tokenizer, args.resolution, args.latent_side)
    if args.init:  # a saved pipeline trained further: its autoencoder as it is, its denoiser from where it was
        args.autoencoder = args.init
        unet = type(unet).from_pretrained(args.init / "unet", torch_dtype=torch.float32)
        text_encoder = type(text_encoder).from_pretrained(args.init / "text_encoder", torch_dtype=torch.float32)
    checkpoints = Checkpoints(args.target, args.checkpoint_every)
    resume = checkpoints.load()
    figures: dict = {
        "arguments": {k: str(v) for k, v in vars(args).items()},
        "machine": f"{machine()}, {torch.get_num_threads()} threads",
        "training_scenes": len(scenes),
        "parameters_millions": {name: round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
                                for name, model in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))},
    }

    if resume is not None and resume["stage"] == "denoiser":
        log(f"[1-2/4] autoencoder and latents: from {checkpoints.path} (resuming after {resume['seconds']:.0f}s)")
        vae = type(vae).from_pretrained(args.target / "vae")
        figures |= resume["figures"]
        latents, pictured, scaling = resume["latents"], resume["pictured"], resume["scaling"]
    else:
        if args.autoencoder:
            log(f"[1/4] autoencoder: reusing {args.autoencoder / 'vae'}")
            vae = type(vae).from_pretrained(args.autoencoder / "vae", torch_dtype=torch.float32)
        else:
            log(f"[1/4] autoencoder: {figures['parameters_millions']['vae']}M parameters")
            losses = train_autoencoder(vae, scenes, args.resolution, args.vae_steps, args.vae_batch, rng, checkpoints,
                                       resume if resume is not None and resume["stage"] == "autoencoder" else None)
            figures["autoencoder_loss"] = statistics.fmean(losses[-50:])
            vae.save_pretrained(args.target / "vae", safe_serialization=True)
        vae.eval().requires_grad_(False)
        figures["autoencoder_seconds"] = checkpoints.seconds()
        figures["judge_on_reconstructions"] = judge_reconstructions(vae, args.resolution, 300, random.Random(1))
        log("  judge on 300 reconstructions: "
            + ", ".join(f"{k} {v['accuracy']}%" for k, v in figures["judge_on_reconstructions"].items()))

        log(f"[2/4] caching latents of {args.latents} pictures")
        latents, pictured, scaling = cache_latents(vae, scenes, args.resolution, args.latents, rng)
        resume = None

    log(f"[3/4] UNet {figures['parameters_millions']['unet']}M + text encoder "
        f"{figures['parameters_millions']['text_encoder']}M parameters")
    denoiser_started = checkpoints.seconds() if resume is None else figures["autoencoder_seconds"]
    saved = {"figures": {key: figures[key] for key in ("autoencoder_loss", "autoencoder_seconds",
                                                       "judge_on_reconstructions") if key in figures},
             "latents": latents, "pictured": pictured, "scaling": scaling}
    ema_unet, ema_text, losses = train_denoiser(unet, text_encoder, tokenizer, latents, pictured, args.unet_steps,
                                                args.batch, rng, checkpoints, resume, saved, peak_lr=args.lr,
                                                noise_offset=args.noise_offset)
    figures["denoiser_loss"] = statistics.fmean(losses[-100:])
    figures["denoiser_loss_curve"] = [round(statistics.fmean(losses[i:i + 100]), 4) for i in range(0, len(losses), 100)]
    figures["denoiser_seconds"] = round(checkpoints.seconds() - denoiser_started, 1)

    log(f"[4/4] saving to {args.target}")
    save_pipeline(args.target, vae, ema_text, ema_unet, tokenizer, scaling)
    figures["seconds"] = checkpoints.seconds()
    (args.target / "training.json").write_text(json.dumps(figures, indent=2) + "\n")
    checkpoints.remove()
    log(f"done in {figures['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
