"""Score a demo model with the judge on unseen (prompt, seed) pairs, at the served defaults.

    python -m training.evaluate MODEL_DIR [--images 300] [--steps N] [--guidance G] [--card]
    python -m training.evaluate MODEL_DIR --size-range 32,48,64,80,96     (the sides it draws well)

Prompts describe random scenes of the world in random phrasings, a third of
them held-out (colour, shape, background) combinations that training never
showed; seeds come from a range training never used. Each image is read back by
`training.judge` and compared with its prompt. Steps, guidance and size default
to `configuration.yaml`'s `defaults`, so the figures describe what `make serve`
serves. Also timed: generation at batch 1 through the server's runner, with the
server's CPU thread setting.

Writes MODEL_DIR/evaluation.json; `--card` also rewrites the scores section of
MODEL_DIR/README.md (between `<!-- evaluate: start -->` and `<!-- evaluate: end -->`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import re
import statistics
import time
from pathlib import Path

import torch

from t2i_task.config.settings import RuntimeConfig, load_settings
from t2i_task.generation.runner import DiffusionRunner, GenerationRequest
from training.judge import ATTRIBUTES, judge, score
from training.shapes import PHRASINGS, Scene, all_scenes, caption
from training.train_demo_model import judge_reconstructions, machine

FIRST_SEED = 1_000_000  # training draws its noise from torch generators seeded below 2**31 by its own rng
CARD_START, CARD_END = "<!-- evaluate: start -->", "<!-- evaluate: end -->"


def unseen_prompts(count: int, seed: int) -> list[tuple[Scene, str, int]]:
    """(scene, prompt, seed) triples, a third of them on held-out combinations."""
    rng = random.Random(seed)
    scenes = all_scenes()
    held_out = [scene for scene in scenes if scene.held_out]
    trained = [scene for scene in scenes if not scene.held_out]
    chosen = [rng.choice(held_out) for _ in range(count // 3)] + [rng.choice(trained) for _ in range(count - count // 3)]
    return [(scene, caption(scene, rng.randrange(len(PHRASINGS))), FIRST_SEED + rng.randrange(10**6))
            for scene in chosen]


def generate_and_judge(runner: DiffusionRunner, cases, steps: int, guidance: float, size: int, batch: int = 16):
    judged = []
    for start in range(0, len(cases), batch):
        chunk = cases[start:start + batch]
        requests = [GenerationRequest(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance,
                                      width=size, height=size, seed=seed) for _, prompt, seed in chunk]
        for (scene, prompt, seed), result in zip(chunk, runner.generate(requests)):
            if result.error:
                raise RuntimeError(f"generation failed for {prompt!r}: {result.error}")
            judged.append((scene, judge(result.images[0]), prompt, seed))
    return judged


def time_batch_one(runner: DiffusionRunner, steps: int, guidance: float, size: int, count: int = 20) -> dict:
    seconds = []
    for index, (_, prompt, seed) in enumerate(unseen_prompts(count + 2, seed=99)):
        request = GenerationRequest(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance,
                                    width=size, height=size, seed=seed)
        started = time.perf_counter()
        runner.generate([request])
        if index >= 2:  # the first calls warm up allocators and caches
            seconds.append(time.perf_counter() - started)
    return {"median_s": round(statistics.median(seconds), 3), "max_s": round(max(seconds), 3), "calls": len(seconds)}


def card_section(results: dict) -> str:
    rows = ["| attribute | all | trained combinations | held-out combinations |", "|---|---|---|---|"]
    for attribute in ATTRIBUTES:
        cells = []
        for part in ("all", "trained", "held_out"):
            entry = results["scores"][part][attribute]
            cells.append("n/a" if entry["accuracy"] is None else f"{entry['accuracy']}% of {entry['images']}")
        rows.append(f"| {attribute} | " + " | ".join(cells) + " |")
    settings = results["settings"]
    timing = results["batch_one"]
    return "\n".join([
        f"Measured {results['date']} on {results['machine']} with `python -m training.evaluate` "
        f"({results['images']} unseen prompt/seed pairs, {settings['steps']} steps, guidance {settings['guidance']}, "
        f"{settings['size']}x{settings['size']}):",
        "",
        *rows,
        "",
        "Position and size count only for prompts that ask for them. The autoencoder's ceiling (the judge on "
        "its reconstructions of 300 drawn pictures): "
        + ", ".join(f"{k} {v['accuracy']}%" for k, v in results["autoencoder_ceiling"].items()) + ".",
        f"Generation at batch 1 through the server's runner ({timing['threads']} torch thread(s)): "
        f"median {timing['median_s']} s per image, slowest {timing['max_s']} s over {timing['calls']} calls.",
    ])


def size_range(args: argparse.Namespace) -> int:
    """The sides a model draws well: 33 unseen (prompt, seed) pairs at each side, judged at that side."""
    defaults = load_settings().defaults
    steps = args.steps or defaults.num_inference_steps
    guidance = defaults.guidance_scale if args.guidance is None else args.guidance
    runner = DiffusionRunner(str(args.model), RuntimeConfig(device="cpu"))
    cases = unseen_prompts(33, args.seed + 1)
    counts = {}
    for side in (int(side) for side in args.size_range.split(",")):
        judged = generate_and_judge(runner, cases, steps, guidance, side)
        counts[side] = sum((seen.colour, seen.shape, seen.background) == (wanted.colour, wanted.shape, wanted.background)
                           for wanted, seen, *_ in judged)
        print(f"{side}x{side}: {counts[side]} of {len(cases)} right", flush=True)
    (args.model / "size_range.json").write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "machine": machine(), "steps": steps, "guidance": guidance,
        "pictures": len(cases), "right": counts}, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--steps", type=int, default=None, help="default: configuration.yaml's")
    parser.add_argument("--guidance", type=float, default=None, help="default: configuration.yaml's")
    parser.add_argument("--seed", type=int, default=2026, help="picks the prompts and seeds")
    parser.add_argument("--size", type=int, default=None, help="default: the side the model was trained at")
    parser.add_argument("--card", action="store_true", help="rewrite the scores section of MODEL/README.md")
    parser.add_argument("--size-range", default=None, metavar="SIDES",
                        help="instead: how many of 33 unseen pictures come out right (colour, shape, background) "
                             "at each square side of SIDES (e.g. 32,48,64,80,96): the range for `sizes`")
    args = parser.parse_args(argv)
    if args.size_range:
        return size_range(args)

    defaults = load_settings().defaults
    steps = args.steps or defaults.num_inference_steps
    guidance = defaults.guidance_scale if args.guidance is None else args.guidance
    runner = DiffusionRunner(str(args.model), RuntimeConfig(device="cpu"))
    size = args.size or runner.pipeline.vae.config.sample_size  # the pictures its autoencoder was trained on
    cases = unseen_prompts(args.images, args.seed)
    started = time.monotonic()
    judged = generate_and_judge(runner, cases, steps, guidance, size)
    print(f"{len(judged)} images generated and judged in {time.monotonic() - started:.0f}s", flush=True)

    results = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "images": len(judged),
        "settings": {"steps": steps, "guidance": guidance, "size": size, "prompt_seed": args.seed},
        "scores": {
            "all": score([(wanted, seen) for wanted, seen, *_ in judged]),
            "trained": score([(wanted, seen) for wanted, seen, *_ in judged if not wanted.held_out]),
            "held_out": score([(wanted, seen) for wanted, seen, *_ in judged if wanted.held_out]),
        },
        # The same judge on the autoencoder's reconstructions of drawn pictures: the ceiling.
        "autoencoder_ceiling": judge_reconstructions(runner.pipeline.vae, size, 300, random.Random(1)),
        "batch_one": {**time_batch_one(runner, steps, guidance, size), "threads": torch.get_num_threads()},
        "misses": [{"prompt": prompt, "seed": seed, "judged": str(seen)}
                   for wanted, seen, prompt, seed in judged
                   if (seen.colour, seen.background, seen.shape) != (wanted.colour, wanted.background, wanted.shape)],
    }
    for part in ("all", "trained", "held_out"):
        print(f"{part:>9}: " + ", ".join(f"{attribute} {entry['accuracy']}%"
                                         for attribute, entry in results["scores"][part].items()))
    print(f"batch 1: median {results['batch_one']['median_s']} s per image")
    (args.model / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")

    if args.card:
        card = args.model / "README.md"
        text = card.read_text()
        section = f"{CARD_START}\n{card_section(results)}\n{CARD_END}"
        card.write_text(re.sub(re.escape(CARD_START) + ".*?" + re.escape(CARD_END), lambda _: section, text,
                               flags=re.DOTALL))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
