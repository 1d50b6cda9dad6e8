"""The offline model command writes a real, loadable, reproducible diffusers pipeline."""

from __future__ import annotations

import subprocess
import sys

from safetensors.torch import load_file
from transformers import CLIPTokenizer

from t2i_task.generation.tiny_model import DEFAULT_WORDS


def test_the_model_is_a_diffusers_folder_with_safetensors_only(tiny_model_path):
    weights = sorted(p.relative_to(tiny_model_path).as_posix() for p in tiny_model_path.rglob("*.safetensors"))
    assert weights == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert not [p for p in tiny_model_path.rglob("*") if p.suffix in {".bin", ".pt", ".ckpt", ".pkl"}]
    assert (tiny_model_path / "model_index.json").is_file()


def test_the_tokenizer_knows_its_words_and_spells_out_the_rest(tiny_model_path):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_path / "tokenizer")
    for word in DEFAULT_WORDS:
        assert len(tokenizer(word).input_ids) == 3, word  # <start> word <end>
    spelt_out = tokenizer("zebra").input_ids
    assert len(spelt_out) == 2 + len("zebra")
    assert tokenizer.unk_token_id not in tokenizer("café ✓").input_ids[1:-1], "every byte has a token"
    assert tokenizer.decode(tokenizer("a red circle on a blue background").input_ids, skip_special_tokens=True) == (
        "a red circle on a blue background"
    )
    assert tokenizer.model_max_length == 77


def test_the_command_writes_the_same_weights_every_time(tiny_model_path, tmp_path):
    target = tmp_path / "again"
    done = subprocess.run(
        [sys.executable, "-m", "t2i_task.generation.tiny_model", str(target)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "wrote tiny Stable Diffusion pipeline" in done.stdout
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        first, second = load_file(tiny_model_path / part), load_file(target / part)
        assert first.keys() == second.keys()
        assert all((first[key] == second[key]).all() for key in first)
