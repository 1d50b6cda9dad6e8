"""DiffusionRunner on the offline model, through diffusers' real loading path."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from t2i_task.config.settings import RuntimeConfig
from t2i_task.generation.runner import DiffusionRunner, GenerationRequest, RuntimeUnavailable, resolve_placement

# Batch size changes the order of floating-point sums inside the UNet, so a
# request alone and inside a batch may differ by rounding; allow at most 2 of 255.
BATCH_TOLERANCE = 2


@pytest.fixture(scope="module")
def runner(tiny_model_path):
    return DiffusionRunner(str(tiny_model_path), RuntimeConfig(device="cpu"))


def request(prompt="a red circle", width=64, height=64, seed=1, **extra) -> GenerationRequest:
    settings = {"num_inference_steps": 2, "guidance_scale": 7.5} | extra
    return GenerationRequest(prompt=prompt, width=width, height=height, seed=seed, **settings)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def max_difference(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def test_cpu_defaults_are_float32_with_pytorch_sdpa_attention(runner):
    import torch

    assert runner.placement.device.type == "cpu" and runner.placement.dtype is torch.float32
    assert runner.placement.attention == "sdpa"
    assert {type(p).__name__ for p in runner.pipeline.unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_a_batch_of_different_requests_comes_back_in_request_order(runner):
    requests = [
        request("a red circle", 64, 64, seed=1),
        request("a blue square", 64, 96, seed=2),
        request("a green triangle", 96, 64, seed=3, num_images=2),
        request("a white circle", 64, 64, seed=4, negative_prompt="blurry"),
    ]
    results = runner.generate(requests)

    assert [[image.size for image in r.images] for r in results] == [
        [(64, 64)],
        [(64, 96)],
        [(96, 64), (96, 64)],
        [(64, 64)],
    ]
    assert [r.seeds for r in results] == [[1], [2], [3, 4], [4]]


def test_a_seeded_request_gives_the_same_image_alone_and_inside_a_batch(runner):
    target = request("a yellow square", seed=1234, negative_prompt="dark")
    alone = runner.generate([target])[0].images[0]
    neighbours = [request(f"prompt {i}", seed=i, negative_prompt="x") for i in range(5)]
    batched = runner.generate([*neighbours[:2], target, *neighbours[2:]])[2].images[0]

    assert max_difference(alone, batched) <= BATCH_TOLERANCE
    other_seed = runner.generate([request("a yellow square", seed=1235, negative_prompt="dark")])[0].images[0]
    assert max_difference(alone, other_seed) > 10, "a different seed must give a different image"


def test_image_k_of_a_request_is_reproduced_by_its_returned_seed(runner):
    result = runner.generate([request(seed=50, num_images=3)])[0]
    assert result.seeds == [50, 51, 52]
    again = runner.generate([request(seed=52)])[0].images[0]
    assert max_difference(result.images[2], again) <= BATCH_TOLERANCE


@pytest.mark.parametrize("random_seed", [None, -1])
def test_a_random_seed_is_returned_and_reproduces_the_image(runner, random_seed):
    first, second = runner.generate([request(seed=random_seed), request(seed=random_seed)])
    assert first.seeds[0] >= 0 and first.seeds != second.seeds
    again = runner.generate([request(seed=first.seeds[0])])[0].images[0]
    assert max_difference(first.images[0], again) <= BATCH_TOLERANCE


def test_matching_requests_share_one_pipeline_call(runner, monkeypatch):
    calls: list[int] = []
    real_call = runner._call

    def counting_call(requests, seeds):
        calls.append(len(seeds))
        return real_call(requests, seeds)

    monkeypatch.setattr(runner, "_call", counting_call)
    runner.generate(
        [request(seed=1), request(width=96, seed=2), request(seed=3, num_images=2), request(width=96, seed=4)]
    )
    assert sorted(calls) == [2, 3]


def test_calls_are_split_when_a_per_call_image_limit_is_set(tiny_model_path):
    limited = DiffusionRunner(str(tiny_model_path), RuntimeConfig(device="cpu"), max_images_per_call=2)
    calls: list[int] = []
    real_call = limited._call
    limited._call = lambda requests, seeds: calls.append(len(seeds)) or real_call(requests, seeds)

    results = limited.generate([request(seed=s) for s in range(5)])
    assert calls == [2, 2, 1]
    assert [r.seeds for r in results] == [[s] for s in range(5)]


def test_a_scheduler_can_replace_the_models_own(tiny_model_path):
    runner = DiffusionRunner(str(tiny_model_path), RuntimeConfig(device="cpu"), scheduler="DDIMScheduler")
    assert type(runner.pipeline.scheduler).__name__ == "DDIMScheduler"
    assert runner.generate([request()])[0].images[0].size == (64, 64)


def test_an_unknown_scheduler_is_a_startup_error(tiny_model_path):
    with pytest.raises(ValueError, match="'NoSuchScheduler' is not a diffusers scheduler"):
        DiffusionRunner(str(tiny_model_path), RuntimeConfig(device="cpu"), scheduler="NoSuchScheduler")


def test_models_with_pickled_weights_are_refused(tiny_model_path, tmp_path):
    import torch
    from safetensors.torch import load_file

    pickled = shutil.copytree(tiny_model_path, tmp_path / "pickled-model")
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))  # a pickle: loading it could run code
    weights.unlink()

    with pytest.raises(Exception, match="safetensors"):
        DiffusionRunner(str(pickled), RuntimeConfig(device="cpu"))


def test_a_missing_model_folder_is_a_startup_error(tmp_path):
    with pytest.raises(Exception):
        DiffusionRunner(str(tmp_path / "nowhere"), RuntimeConfig(device="cpu"))


@pytest.mark.parametrize(
    ("runtime", "message"),
    [
        (RuntimeConfig(device="cuda"), "no CUDA device"),
        (RuntimeConfig(device="cpu", attention="xformers"), "'xformers' but it needs CUDA"),
        (RuntimeConfig(device="cpu", dtype="float16"), "'float16' needs CUDA"),
    ],
)
def test_forced_choices_that_cannot_be_honoured_fail_at_start(runtime, message):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: these choices can be honoured")
    with pytest.raises(RuntimeUnavailable, match=message):
        resolve_placement(runtime)


def test_bfloat16_on_cpu_is_honoured(tiny_model_path):
    import torch

    runner = DiffusionRunner(str(tiny_model_path), RuntimeConfig(device="cpu", dtype="bfloat16"))
    assert runner.pipeline.unet.dtype is torch.bfloat16
    assert runner.generate([request()])[0].images[0].size == (64, 64)


def test_the_runner_loads_a_copied_model_folder_offline(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    copy = shutil.copytree(tiny_model_path, tmp_path / "copy")
    assert DiffusionRunner(str(copy), RuntimeConfig(device="cpu")).generate([request()])[0].images


def test_a_failing_request_does_not_fail_its_batch_neighbours(runner, monkeypatch):
    import torch

    real_call = runner._call
    calls: list[int] = []

    def call_that_runs_out_of_memory_on_poison(requests, seeds):
        calls.append(len(seeds))
        if any(r.prompt == "poison" for r in requests):
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real_call(requests, seeds)

    monkeypatch.setattr(runner, "_call", call_that_runs_out_of_memory_on_poison)
    results = runner.generate([request("fine 1", seed=1), request("poison", seed=2), request("fine 2", seed=3)])

    assert calls == [3, 1, 1, 1], "the batch, then each request alone"
    assert [r.error for r in results] == [None, "OutOfMemoryError: simulated: CUDA out of memory", None]
    assert [len(r.images) for r in results] == [1, 0, 1]
    alone = real_call([request("fine 2", seed=3)], [3])[0]
    assert max_difference(results[2].images[0], alone) <= BATCH_TOLERANCE


def test_a_model_that_names_its_own_pipeline_code_is_refused_without_running_it(tiny_model_path, tmp_path):
    import json

    custom = shutil.copytree(tiny_model_path, tmp_path / "custom-code")
    (custom / "pipeline.py").write_text("raise SystemExit('remote code ran')\n")
    index = json.loads((custom / "model_index.json").read_text())
    index["_class_name"] = ["pipeline", "CustomPipeline"]
    (custom / "model_index.json").write_text(json.dumps(index))

    with pytest.raises(Exception) as error:
        DiffusionRunner(str(custom), RuntimeConfig(device="cpu"))
    assert not isinstance(error.value, SystemExit)


@pytest.fixture
def fake_xformers(monkeypatch):
    """An installed xformers whose attention call does what the test says: the probe must
    judge it by that call, not by the package being importable."""
    import importlib.machinery
    import sys
    import types

    def install(attention):
        package = types.ModuleType("xformers")
        package.__spec__ = importlib.machinery.ModuleSpec("xformers", None)
        ops = types.ModuleType("xformers.ops")
        ops.memory_efficient_attention = attention
        package.ops = ops
        monkeypatch.setitem(sys.modules, "xformers", package)
        monkeypatch.setitem(sys.modules, "xformers.ops", ops)

    return install


def test_xformers_is_used_only_if_a_test_call_through_it_works(fake_xformers):
    import torch

    from t2i_task.generation.runner import xformers_problem

    fake_xformers(lambda q, k, v: q)
    assert xformers_problem(torch.device("cpu"), torch.float32) is None

    def broken(q, k, v):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`\nmore detail")

    fake_xformers(broken)
    problem = xformers_problem(torch.device("cpu"), torch.float32)
    assert problem == "a test call failed (NotImplementedError: No operator found for `memory_efficient_attention_forward`)"


def test_an_installed_xformers_that_cannot_run_falls_back_to_sdpa_or_fails_when_forced(fake_xformers, monkeypatch, caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA, to pretend one whose xformers is broken")
    # CUDA "available" but this torch cannot place tensors there: the probe's call fails, as
    # it does for an xformers wheel built for another torch.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fake_xformers(lambda q, k, v: q)

    with caplog.at_level("WARNING", logger="t2i_task.generation.runner"):
        placement = resolve_placement(RuntimeConfig(attention="auto"))
    assert placement.attention == "sdpa"
    assert "PyTorch SDPA, not xformers: a test call failed" in caplog.text

    with pytest.raises(RuntimeUnavailable, match="runtime.attention is 'xformers' but a test call failed"):
        resolve_placement(RuntimeConfig(attention="xformers"))


def test_a_compiler_that_fails_is_a_startup_error_when_forced_and_a_logged_fallback_otherwise(
    tiny_model_path, monkeypatch, caplog
):
    import torch

    class FailsWhenCalled(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            raise RuntimeError("inductor: C++ compiler not found\ntraceback")

        def __getattr__(self, name):  # the pipeline reads the UNet's config and dtype
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    monkeypatch.setattr(torch, "compile", FailsWhenCalled)
    with pytest.raises(RuntimeUnavailable, match="compiling the UNet failed .RuntimeError: inductor: C.. compiler"):
        DiffusionRunner(str(tiny_model_path), RuntimeConfig(device="cpu", compile=True))

    runner = DiffusionRunner(str(tiny_model_path), RuntimeConfig(device="cpu"))
    eager = runner.pipeline.unet
    with caplog.at_level("WARNING", logger="t2i_task.generation.runner"):
        runner._compile_unet(forced=False)  # what `compile: auto` does on CUDA
    assert runner.pipeline.unet is eager
    assert "running the UNet uncompiled: torch.compile failed (RuntimeError: inductor" in caplog.text
    [result] = runner.generate([request()])
    assert result.error is None and len(result.images) == 1


def test_a_call_whose_jobs_are_all_cancelled_stops_at_the_next_step(runner, monkeypatch):
    steps: list[int] = []
    stop_unwanted = runner._step_callback

    def cancel_at_step_two(*call):  # the cancel arrives, from another thread, while step 2 runs
        check = stop_unwanted(*call)

        def on_step_end(pipeline, step, timestep, callback_kwargs):
            steps.append(step)
            if step == 1:
                runner.cancel([11])
            return check(pipeline, step, timestep, callback_kwargs)

        return on_step_end

    monkeypatch.setattr(runner, "_step_callback", cancel_at_step_two)
    [result] = runner.generate([request(num_inference_steps=50, job=11)])
    assert steps == [0, 1] and result.error.startswith("Cancelled") and not result.images

    runner.cancel([12])  # before its call: it never starts
    steps.clear()
    [result] = runner.generate([request(job=12)])
    assert steps == [] and result.error.startswith("Cancelled")
    # Nothing of either stays cancelled: the ids may run again.
    assert runner._cancelled == set()


def test_a_cancelled_job_leaves_its_batch_mates_untouched(runner, monkeypatch):
    alone = runner.generate([request(prompt="a white circle", seed=7, num_inference_steps=4, job=21)])[0]
    stop_unwanted = runner._step_callback

    def cancel_one_at_step_one(*call):
        check = stop_unwanted(*call)

        def on_step_end(pipeline, step, timestep, callback_kwargs):
            if step == 0:
                runner.cancel([23])
            return check(pipeline, step, timestep, callback_kwargs)

        return on_step_end

    monkeypatch.setattr(runner, "_step_callback", cancel_one_at_step_one)
    kept, _ = runner.generate([request(prompt="a white circle", seed=7, num_inference_steps=4, job=22),
                               request(prompt="noise", seed=8, num_inference_steps=4, job=23)])
    assert kept.error is None
    assert np.abs(pixels(alone.images[0]) - pixels(kept.images[0])).max() <= BATCH_TOLERANCE


def after_each_step(runner, monkeypatch, look) -> list:
    """What `look()` returns after the runner's own step callback, at each step: what another
    thread (the service's `progress` and `previews`) would read then."""
    seen: list = []
    callback_for = runner._step_callback

    def watching(*call):
        callback = callback_for(*call)

        def on_step_end(pipeline, step, timestep, callback_kwargs):
            kwargs = callback(pipeline, step, timestep, callback_kwargs)
            seen.append(look())
            return kwargs

        return on_step_end

    monkeypatch.setattr(runner, "_step_callback", watching)
    return seen


def test_the_running_call_reports_each_jobs_steps(runner, monkeypatch):
    seen = after_each_step(runner, monkeypatch, runner.progress)
    runner.generate([request(num_inference_steps=3, job=31), request(num_inference_steps=3, job=32, seed=2)])
    assert seen == [{31: (1, 3), 32: (1, 3)}, {31: (2, 3), 32: (2, 3)}, {31: (3, 3), 32: (3, 3)}]
    assert runner.progress() == {}  # the call is over


def test_partial_images_are_decoded_at_spread_steps_and_leave_the_image_unchanged(runner, monkeypatch):
    plain = runner.generate([request(prompt="a red circle", seed=5, num_inference_steps=6)])[0]
    live = after_each_step(runner, monkeypatch, lambda: len(runner.previews(41)))
    [previewed, mate] = runner.generate([
        request(prompt="a red circle", seed=5, num_inference_steps=6, partial_images=2, job=41),
        request(prompt="a blue square", seed=6, num_inference_steps=6, job=42),
    ])
    # Two previews, after steps 2 and 4 of 6, each an image of the asked size; none for the batch-mate.
    assert live == [0, 1, 1, 2, 2, 2]
    assert len(previewed.previews) == 2 and mate.previews == []
    assert all(p.size == (64, 64) and p.mode == "RGB" for p in previewed.previews)
    assert max_difference(previewed.previews[0], previewed.previews[1]) > 0  # a later step looks different
    assert max_difference(plain.images[0], previewed.images[0]) <= BATCH_TOLERANCE
    assert runner.previews(41) == []  # the call is over: they went out with its result
    assert previewed.prompt_tokens == len(runner.pipeline.tokenizer("a red circle").input_ids)


@pytest.mark.parametrize(("steps", "count", "expected"), [
    (10, 2, {4, 7}), (10, 3, {3, 5, 8}), (6, 1, {3}), (2, 3, {1}), (1, 3, set()), (10, 0, set()),
])
def test_preview_steps_are_spread_before_the_last_step(steps, count, expected):
    from t2i_task.generation.previews import preview_steps

    assert preview_steps(steps, count) == expected
