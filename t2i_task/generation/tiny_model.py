"""Write a tiny Stable Diffusion pipeline (random weights) in diffusers format.

No machine of this project can download weights, yet the server, its tests and
its benchmarks must load a model through the same `from_pretrained` path as a
real one. This builds that model in a few seconds from fixed seeds:

    python -m t2i_task.generation.tiny_model models/tiny-sd

The weights are random, so the images are noise; the shapes, the files and
the code paths are those of Stable Diffusion 1.x (VAE scale factor 8, CLIP text
encoder and BPE tokenizer, UNet with cross-attention). With `--architecture
sd15` it writes Stable Diffusion 1.5's full-size architecture instead (random
weights, about 1 GB in float16), for GPU benchmarks.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch

# Words that get a token of their own (the rest is spelt out byte by byte).
DEFAULT_WORDS = (
    "a an the of on in with and photo picture painting drawing cat dog house tree car "
    "red green blue yellow white black purple orange circle square triangle background "
    "small large left right top bottom center"
).split()

SEED = 0
CONTEXT_LENGTH = 77  # CLIP's


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255 (GPT-2's scheme)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[byte] = chr(byte)
        else:
            alphabet[byte] = chr(256 + extra)
            extra += 1
    return [alphabet[byte] for byte in range(256)]


def build_tokenizer(words: Iterable[str] = DEFAULT_WORDS):
    """A CLIP BPE tokenizer over bytes, with one token for each of `words`.

    Like CLIP's own, its base vocabulary is every byte, alone and word-final
    (`x</w>`), so any text can be spelt out. The merges come from training BPE
    on `words` (tokenizers' trainer), which makes each listed word one token.
    """
    import json

    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    trained = CLIPTokenizer(model_max_length=CONTEXT_LENGTH).train_new_from_iterator(
        [" ".join(words)], vocab_size=100_000, initial_alphabet=alphabet
    )
    merges = [tuple(pair) for pair in json.loads(trained.backend_tokenizer.to_str())["model"]["merges"]]

    tokens = [*alphabet, *(char + "</w>" for char in alphabet), *(a + b for a, b in merges)]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT_LENGTH)


# Sizes of the two architectures this module writes; everything else is shared.
ARCHITECTURES = {
    # Stable Diffusion 1.x at toy size: loads in a fraction of a second on a CPU.
    "tiny": {
        "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2},
        "unet": {
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "cross_attention_dim": 32,
        },
        "vae": {"block_out_channels": (16, 16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64},
    },
    # Stable Diffusion 1.5's published configuration (860M-parameter UNet), for
    # GPU benchmarks that must run the real architecture without a download.
    "sd15": {
        "text_encoder": {
            "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
            "hidden_act": "quick_gelu", "vocab_size": 49408,
        },
        "unet": {
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
        },
        "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512},
    },
}


def build_pipeline(words: Iterable[str] = DEFAULT_WORDS, architecture: str = "tiny"):
    """A StableDiffusionPipeline of the given architecture with seeded random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sizes = ARCHITECTURES[architecture]
    torch.manual_seed(SEED)
    tokenizer = build_tokenizer(words)
    text_config = {"vocab_size": len(tokenizer), **sizes["text_encoder"]}
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **text_config,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, attention_head_dim=8, norm_num_groups=32, **sizes["unet"]
    )
    # Four levels: the VAE scale factor is 8, as in Stable Diffusion.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        **sizes["vae"],
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="trailing"
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_tiny_model(target: str | Path, architecture: str = "tiny") -> Path:
    """Build the pipeline and save it to `target` (safetensors), replacing what is there.

    It is written into a temporary folder first and moved into place, so an
    interrupted build never leaves a half-written model behind. The large
    architecture is stored in float16, as real checkpoints are.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(architecture=architecture)
    if architecture != "tiny":
        pipeline.to(torch.float16)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as staging:
        staged = Path(staging) / "model"
        pipeline.save_pretrained(staged, safe_serialization=True)
        parameters = {
            name: sum(p.numel() for p in getattr(pipeline, name).parameters()) for name in ("unet", "vae", "text_encoder")
        }
        (staged / "README.md").write_text(
            f"# {architecture} Stable Diffusion pipeline (random weights)\n\n"
            f"Written by `python -m t2i_task.generation.tiny_model --architecture {architecture}`, with seeded random weights "
            f"(seed {SEED}): it produces noise, and exists so that the server, tests and benchmarks load a model "
            "through the real diffusers path without any download.\n\n"
            f"Parameters: {json.dumps(parameters)}\n"
        )
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", type=Path, help="folder to write the pipeline into")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="tiny",
                        help="tiny (default) or sd15: Stable Diffusion 1.5's real sizes, for GPU benchmarks")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    target = write_tiny_model(args.target, args.architecture)
    print(f"wrote {args.architecture} Stable Diffusion pipeline to {target} in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
