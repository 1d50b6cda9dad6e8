"""The demo model's training script runs end to end on a tiny budget and writes a loadable pipeline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from t2i_task.config.settings import RuntimeConfig
from t2i_task.generation.runner import DiffusionRunner, GenerationRequest
from t2i_task.local_server import PROJECT_ROOT
from training.shapes import HELD_OUT, vocabulary
from training.train_demo_model import training_scenes


def test_held_out_combinations_are_never_trained_on():
    assert not [s for s in training_scenes() if (s.colour, s.shape, s.background) in HELD_OUT]


def test_a_smoke_run_writes_a_pipeline_the_server_loads(tmp_path):
    target = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "training.train_demo_model", str(target), "--vae-steps", "3", "--latents", "32",
         "--unet-steps", "3", "--batch", "4"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[4/4] saving" in done.stdout
    figures = json.loads((target / "training.json").read_text())
    assert figures["autoencoder_loss"] > 0 and figures["denoiser_loss"] > 0
    assert not [p for p in target.rglob("*") if p.suffix in {".bin", ".pt", ".ckpt"}]

    runner = DiffusionRunner(str(target), RuntimeConfig(device="cpu"))
    tokenizer = runner.pipeline.tokenizer
    assert all(len(tokenizer(word).input_ids) == 3 for word in vocabulary()), "one token per world word"
    [result] = runner.generate([GenerationRequest(prompt="a red circle on a blue background", num_inference_steps=2,
                                                  guidance_scale=4.0, width=64, height=64, seed=1)])
    assert result.images[0].size == (64, 64)


def test_a_saved_pipeline_trains_further_with_offset_noise(tmp_path):
    first, further = tmp_path / "first", tmp_path / "further"
    small = ["--vae-steps", "3", "--latents", "32", "--unet-steps", "3", "--batch", "4"]
    for target, extra in ((first, []), (further, ["--init", str(first), "--noise-offset", "0.1", "--lr", "1e-4"])):
        done = subprocess.run([sys.executable, "-m", "training.train_demo_model", str(target), *small, *extra],
                              cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert f"autoencoder: reusing {first / 'vae'}" in done.stdout
    from safetensors.torch import load_file

    weights = [load_file(folder / "vae" / "diffusion_pytorch_model.safetensors") for folder in (first, further)]
    assert all((weights[0][key] == weights[1][key]).all() for key in weights[0]), "the autoencoder is kept as it was"
    unets = [load_file(folder / "unet" / "diffusion_pytorch_model.safetensors") for folder in (first, further)]
    assert any((unets[0][key] != unets[1][key]).any() for key in unets[0]), "the denoiser trained further"


def test_evaluation_scores_a_model_and_rewrites_only_its_card_section(tmp_path, tiny_model_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    (model / "README.md").write_text("# card\n\nkept\n<!-- evaluate: start -->\nold\n<!-- evaluate: end -->\ntail\n")
    done = subprocess.run(
        [sys.executable, "-m", "training.evaluate", str(model), "--images", "6", "--steps", "2", "--card"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((model / "evaluation.json").read_text())
    assert results["images"] == 6 and results["settings"]["steps"] == 2
    assert sum(e["images"] for e in (results["scores"]["held_out"]["shape"], results["scores"]["trained"]["shape"])) == 6
    assert results["scores"]["held_out"]["shape"]["images"] == 2  # a third of the prompts
    assert results["batch_one"]["median_s"] > 0
    card = (model / "README.md").read_text()
    assert "old" not in card and "kept" in card and "tail" in card and "| shape |" in card
