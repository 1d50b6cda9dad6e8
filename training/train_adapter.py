"""Train a LoRA adapter that teaches a shipped model a shape it never saw (`make adapter-ring`).

    .venv/bin/python -m training.train_adapter demo_model_64 models/adapter-ring --shape ring

The base model's weights stay as they are: low-rank adapters (PEFT's LoRA, rank `--rank`) on the
UNet's attention and its ResNet blocks' convolutions learn from pictures the project draws,
most of the new shape and the rest of the shapes the model knows (so that it keeps drawing them as
before), encoded once by the model's own autoencoder, which the adapter cannot change: what it
cannot keep of a shape (measured first: `--measure`), no adapter can draw. The adapter is saved
as one safetensors file in diffusers' LoRA format (`<name>.safetensors`), which the server loads
from a model's `loras_dir`. Seeded; checkpoints every `--checkpoint-every` steps to OUT/checkpoint.pt
and resumes from there when run again (training/train_demo_model.py, Checkpoints).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from training.judge import judge
from training.shapes import HELD_OUT, SHAPES, all_scenes, caption, render
from training.train_demo_model import (
    EMPTY_CAPTION_SHARE,
    Checkpoints,
    learning_rate,
    log,
    machine,
    random_states,
    restore_random_states,
    to_tensor,
)

# Attention (what the words mean) and the ResNet blocks' convolutions (how shapes are drawn: an
# attention-only adapter learnt that a ring is round, not that it has a hole).
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
# The text encoder stays frozen: transformers 5's PEFT integration (what diffusers loads a text
# encoder's LoRA through) needs a PEFT release newer than any on the package index here; the UNet's
# cross-attention learns what the new word's tokens mean (the tokenizer splits it into letters).


@torch.no_grad()
def kept_by_autoencoder(vae, shape: str, resolution: int, count: int, rng: random.Random) -> dict:
    """How the autoencoder keeps drawn pictures of `shape`, by size word: the judge's reading of
    each reconstruction (shape and both colours right), the ceiling for what an adapter can draw."""
    from PIL import Image

    chosen = [rng.choice(all_scenes((shape,))) for _ in range(count)]
    decoded = vae.decode(vae.encode(to_tensor([render(s, resolution, rng) for s in chosen])).latent_dist.mean).sample
    pictures = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    kept: dict[str, dict[str, int]] = {}
    for scene, picture in zip(chosen, pictures):
        seen = judge(Image.fromarray(picture))
        row = kept.setdefault(scene.size or "unspecified", {"pictures": 0, "shape": 0, "colours": 0})
        row["pictures"] += 1
        row["shape"] += seen.shape == shape
        row["colours"] += (seen.colour, seen.background) == (scene.colour, scene.background)
    return kept


@torch.no_grad()
def cache_latents(vae, scenes, resolution: int, rng: random.Random, batch: int = 256):
    latents = [vae.encode(to_tensor([render(s, resolution, rng) for s in scenes[start:start + batch]])).latent_dist.mean
               for start in range(0, len(scenes), batch)]
    return torch.cat(latents) * vae.config.scaling_factor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="the model's diffusers folder")
    parser.add_argument("target", type=Path, help="where the adapter and its checkpoint go")
    parser.add_argument("--shape", default="ring")
    parser.add_argument("--name", default=None, help="the adapter's name (default: the shape's)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--pictures", type=int, default=6000, help="drawn pictures whose latents are cached")
    parser.add_argument("--new-share", type=float, default=0.7, help="share of them showing the new shape")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--noise-offset", type=float, default=0.1, help="as the base was trained (its card)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--measure", action="store_true", help="only measure what the autoencoder keeps")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    name = args.name or args.shape
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    pipeline = StableDiffusionPipeline.from_pretrained(args.base, safety_checker=None, torch_dtype=torch.float32)
    vae, unet, text_encoder, tokenizer = pipeline.vae, pipeline.unet, pipeline.text_encoder, pipeline.tokenizer
    kept = kept_by_autoencoder(vae, args.shape, args.resolution, 300, random.Random(args.seed + 1))
    log(f"the autoencoder keeps {args.shape} (shape right, colours right, of pictures, by size): {kept}")
    if args.measure:
        print(json.dumps(kept))
        return 0

    for model in (vae, unet, text_encoder):
        model.requires_grad_(False)
    text_encoder.eval()
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=UNET_TARGETS))
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=1e-2)
    checkpoints = Checkpoints(args.target, args.checkpoint_every)
    resume = checkpoints.load()

    new_count = round(args.pictures * args.new_share)
    # The base model's held-out colour pairs are the adapter's too: the evaluation's unseen compositions.
    unseen = {(colour, background) for colour, _, background in HELD_OUT}
    new_scenes = [s for s in all_scenes((args.shape,)) if (s.colour, s.background) not in unseen]
    scenes = ([rng.choice(new_scenes) for _ in range(new_count)]
              + [rng.choice([s for s in all_scenes(SHAPES) if not s.held_out]) for _ in range(args.pictures - new_count)])
    log(f"caching the latents of {len(scenes)} drawn pictures ({new_count} of {args.shape}s)")
    latents = cache_latents(vae, scenes, args.resolution, rng)
    schedule = DDPMScheduler.from_pretrained(args.base, subfolder="scheduler")
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    losses: list[float] = []
    first = 1
    if resume is not None:
        set_peft_model_state_dict(unet, resume["unet"])
        optimizer.load_state_dict(resume["optimizer"])
        restore_random_states(resume["random"], rng, generator)
        losses, first = resume["losses"], resume["step"] + 1
        log(f"resuming at step {first}")
    unet.train()
    started = time.monotonic()
    for step in range(first, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        index = torch.randint(0, len(latents), (args.batch,), generator=generator)
        clean = latents[index]
        captions = ["" if rng.random() < EMPTY_CAPTION_SHARE else caption(scenes[i], rng.randrange(4))
                    for i in index.tolist()]
        tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids
        noise = torch.randn(clean.shape, generator=generator)
        if args.noise_offset:
            noise += args.noise_offset * torch.randn((*clean.shape[:2], 1, 1), generator=generator)
        timesteps = torch.randint(0, schedule.config.num_train_timesteps, (args.batch,), generator=generator)
        with torch.no_grad():
            context = text_encoder(tokens)[0]
        prediction = unet(schedule.add_noise(clean, noise, timesteps), timesteps, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 30) == 0 or step == args.steps:
            log(f"  adapter {step}/{args.steps}: loss {statistics.fmean(losses[-100:]):.4f} "
                f"({time.monotonic() - started:.0f}s)")
        if checkpoints.due(step, args.steps):
            checkpoints.save({"step": step, "unet": get_peft_model_state_dict(unet), "optimizer": optimizer.state_dict(), "random": random_states(rng, generator),
                              "losses": losses, "seconds": checkpoints.seconds()})

    args.target.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        # PEFT's own key names: diffusers reads them for every layer kind (its older names, which
        # convert_state_dict_to_diffusers gives attention layers alone, were then skipped on load).
        args.target, unet_lora_layers=get_peft_model_state_dict(unet), weight_name=f"{name}.safetensors", safe_serialization=True)
    (args.target / f"{name}.training.json").write_text(json.dumps({
        "base": str(args.base), "shape": args.shape, "steps": args.steps, "batch": args.batch, "rank": args.rank,
        "lr": args.lr, "pictures": args.pictures, "new_share": args.new_share, "noise_offset": args.noise_offset,
        "seed": args.seed, "seconds": checkpoints.seconds(), "machine": machine(),
        "final_loss": statistics.fmean(losses[-100:]), "autoencoder_keeps": kept,
    }, indent=2) + "\n")
    checkpoints.remove()
    log(f"saved {args.target / (name + '.safetensors')} after {checkpoints.seconds():.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
