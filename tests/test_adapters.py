"""LoRA adapters per request, through the real server: listed, applied only to the requests that ask
for them (alone or batched with others), refused by name when unknown, a broken file reported and
harmless, a new file offered without a restart."""

from __future__ import annotations

import base64
import io
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from tests.gate import wait_for
from tests.test_service import BATCH_TOLERANCE, send_behind_a_running_batch

SEED, PROMPT = 4242, "a red circle on a blue background"


def make_lora(model_path: Path, target: Path, name: str, seed: int, rank: int = 4) -> Path:
    """A LoRA for the tiny model's UNet with random weights (a real file, as diffusers saves one)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for parameter_name, parameter in unet.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(0, 0.5)  # B starts at zero: an adapter that changes nothing
    StableDiffusionPipeline.save_lora_weights(
        target, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        weight_name=f"{name}.safetensors")
    return target / f"{name}.safetensors"


@pytest.fixture(scope="module")
def loras_dir(tiny_model_path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    make_lora(tiny_model_path, folder, "sparkle", seed=1)
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    return folder


@pytest.fixture(scope="module")
def server_config(loras_dir):
    return {"model": {"loras_dir": str(loras_dir)}}


def picture(response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))).convert("RGB"), np.int16)


def generate(client, loras=None, seed=SEED, prompt=PROMPT):
    extra = {"seed": seed, "num_inference_steps": 3, **({"loras": loras} if loras is not None else {})}
    return lambda: client.images.generate(prompt=prompt, size="64x64", response_format="b64_json", extra_body=extra)


def adapters(client) -> dict[str, str]:
    [model] = client.models.list().data
    return {adapter["name"]: adapter["status"] for adapter in model.model_extra["adapters"]}


def test_the_models_adapters_are_listed_and_a_broken_file_is_reported_by_name(client, server):
    listed = adapters(client)
    assert listed["sparkle"] == "ok"
    assert listed["broken"].startswith("unavailable: ")
    assert "broken" in server.log.read_text(), "the log names the file that does not load"


def test_an_adapter_changes_the_picture_and_scale_zero_or_none_gives_the_base_models(client):
    base = picture(generate(client)())
    with_adapter = picture(generate(client, [{"name": "sparkle", "scale": 1.0}])())
    assert np.abs(base - with_adapter).max() > 10
    assert np.abs(base - picture(generate(client, [{"name": "sparkle", "scale": 0.0}])())).max() <= BATCH_TOLERANCE
    assert np.array_equal(base, picture(generate(client)())), "the adapter is off again for the next call"


@pytest.mark.parametrize(("loras", "named"), [
    ([{"name": "nope"}], "'nope' is not available"),
    ([{"name": "broken"}], "'broken' is not available"),
    ([{"name": "sparkle", "scale": 5}], "loras"),
])
def test_an_unknown_or_broken_adapter_or_a_bad_scale_is_a_400_naming_the_available_ones(client, loras, named):
    with pytest.raises(openai.BadRequestError) as refused:
        generate(client, loras)()
    assert named in refused.value.message and refused.value.body["param"].startswith("loras")
    if "available" in named:
        assert "available: sparkle" in refused.value.message


def test_requests_with_other_adapter_sets_in_one_batch_each_get_their_own_picture(server, gate, client):
    sets = [None, [{"name": "sparkle"}], [{"name": "sparkle", "scale": 0.5}], None] * 2
    calls = [generate(client, loras, seed=SEED + i, prompt=f"{PROMPT} {i}") for i, loras in enumerate(sets)]
    alone = [picture(call()) for call in calls]
    with ThreadPoolExecutor(8) as pool:
        together = [picture(response) for response in send_behind_a_running_batch(server, gate, pool, calls)]
    for i, (one, other) in enumerate(zip(alone, together)):
        assert np.abs(one - other).max() <= BATCH_TOLERANCE, f"request {i} ({sets[i]}) got another picture"


def test_an_adapter_added_to_the_folder_is_offered_without_a_restart(client, loras_dir, tiny_model_path, tmp_path):
    made = make_lora(tiny_model_path, tmp_path, "glow", seed=2)
    shutil.copy(made, loras_dir / "glow.safetensors")
    wait_for(lambda: adapters(client).get("glow") in ("ok", "not checked yet"), timeout=30, what="glow listed")
    assert np.abs(picture(generate(client, [{"name": "glow"}])()) - picture(generate(client)())).max() > 10
    assert adapters(client)["glow"] == "ok" and adapters(client)["sparkle"] == "ok"
