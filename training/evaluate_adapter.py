"""Score a shape adapter on the project's judge, with and without it (`make adapter-ring`).

    .venv/bin/python -m training.evaluate_adapter demo_model_64 models/adapter-ring --shape ring [--card DIR]

Prompts of the new shape in every colour pair, phrasing, position and size, with seeds the
training never used (it drew pictures, not seeds), at the model's defaults: the share of images
the judge reads as the shape (a star or a ring: area over convex-hull area below 0.75, a ring
with a hole) and with both colours right, with the adapter at scale 1 and without it; and the
shapes the model knew, with the adapter on, to see that it still draws them. `--card DIR`
writes DIR/evaluation-<name>.json.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from training.judge import judge
from training.shapes import HELD_OUT, PHRASINGS, SHAPES, all_scenes, caption
from training.train_demo_model import machine

EVALUATION_SEEDS = 1_000_000  # seeds from here on: none was ever used in training


def generate(runner, cases, loras, steps: int, guidance: float, size: int, batch: int = 16):
    from t2i_task.generation.runner import GenerationRequest

    seen = []
    for start in range(0, len(cases), batch):
        part = cases[start:start + batch]
        requests = [GenerationRequest(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, width=size,
                                      height=size, seed=seed, loras=loras) for _, prompt, seed in part]
        for (scene, _, _), result in zip(part, runner.generate(requests)):
            if result.error:
                raise RuntimeError(result.error)
            seen.append((scene, judge(result.images[0])))
    return seen


def shares(pairs, shape: str) -> dict:
    def share(condition) -> float:
        return round(100 * sum(condition(w, s) for w, s in pairs) / max(1, len(pairs)), 1)

    return {"images": len(pairs), "shape": share(lambda w, s: s.shape == shape),
            "concave": share(lambda w, s: s.shape in ("ring", "star")),
            "colours": share(lambda w, s: (s.colour, s.background) == (w.colour, w.background))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("adapter", type=Path, help="the folder holding <name>.safetensors")
    parser.add_argument("--shape", default="ring")
    parser.add_argument("--name", default=None)
    parser.add_argument("--count", type=int, default=160)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--card", type=Path, default=None)
    args = parser.parse_args(argv)
    from t2i_task.config.settings import RuntimeConfig
    from t2i_task.generation.runner import DiffusionRunner

    name = args.name or args.shape
    rng = random.Random(args.seed)
    cases = [(scene, caption(scene, rng.randrange(len(PHRASINGS))), EVALUATION_SEEDS + i)
             for i, scene in enumerate(rng.choice(all_scenes((args.shape,))) for _ in range(args.count))]
    known = [(scene, caption(scene, rng.randrange(len(PHRASINGS))), EVALUATION_SEEDS + 10_000 + i)
             for i, scene in enumerate(rng.choice(all_scenes(SHAPES)) for _ in range(args.count // 2))]
    runner = DiffusionRunner(str(args.base), RuntimeConfig(), loras_dir=str(args.adapter))
    steps, guidance, size = 10, 3.0, 64
    with_adapter = generate(runner, cases, ((name, 1.0),), steps, guidance, size)
    without = generate(runner, cases, (), steps, guidance, size)
    known_with = generate(runner, known, ((name, 1.0),), steps, guidance, size)
    unseen_pairs = {(colour, background) for colour, _, background in HELD_OUT}
    results = {
        "adapter": name, "shape": args.shape, "base": str(args.base), "steps": steps, "guidance": guidance,
        "size": size, "machine": machine(),
        "with_adapter": shares(with_adapter, args.shape),
        "with_adapter_by_size": {str(size_word): shares([p for p in with_adapter if p[0].size == size_word],
                                                        args.shape) for size_word in (None, "small", "large")},
        "with_adapter_unseen_colour_pairs": shares([p for p in with_adapter
                                                    if (p[0].colour, p[0].background) in unseen_pairs], args.shape),
        "without_adapter": shares(without, args.shape),
        "known_shapes_with_adapter": {
            "images": len(known_with),
            "shape": round(100 * sum(w.shape == s.shape for w, s in known_with) / len(known_with), 1),
            "colours": round(100 * sum((w.colour, w.background) == (s.colour, s.background)
                                       for w, s in known_with) / len(known_with), 1)},
    }
    print(json.dumps(results, indent=2))
    if args.card:
        (args.card / f"evaluation-{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
