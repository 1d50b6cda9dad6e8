"""Hooks loaded into a test server's interpreters (`tests/server_hooks` on PYTHONPATH).

They let a test decide what happens inside the model worker instead of hoping
that timing does it, so no test depends on how fast this machine is or how
the batcher happened to group requests:

- `T2I_TEST_GATE=<file>`: while the file exists, each pipeline call waits before
  it starts, after appending its prompt count to `<file>.entered`. The test
  holds generations in flight (to crash, drain or fill a server) and releases
  them by removing the file.
- `T2I_TEST_POISON=<word>`: a pipeline call with the word in a prompt raises
  torch.OutOfMemoryError, as a GPU that runs out of memory does.
- With the gate, each call also appends `<first prompt>\t<steps it ran>` to
  `<file>.steps` when it returns: a test sees where a cancelled call stopped.
- While `<file>.hold-after-step` exists and holds a number N, a call that has run
  N steps waits there (after its step callback), having written N to
  `<file>.held-at-step`: a test looks at a call part-way through.
- `T2I_TEST_LOAD_DELAY_S=<seconds>`: loading a model takes that much longer,
  as a large model's does; with `T2I_TEST_SLOW_LOADS=<text>`, only a model whose
  path contains that text.
"""

import os
import time

import diffusers
import torch

GATE = os.environ.get("T2I_TEST_GATE")
POISON = os.environ.get("T2I_TEST_POISON")
LOAD_DELAY_S = float(os.environ.get("T2I_TEST_LOAD_DELAY_S", "0"))
SLOW_LOADS = os.environ.get("T2I_TEST_SLOW_LOADS", "")
_real_call = diffusers.StableDiffusionPipeline.__call__
_real_load = diffusers.AutoPipelineForText2Image.from_pretrained.__func__


def _hooked_call(self, *args, **kwargs):
    prompts = kwargs.get("prompt") or []
    if GATE and os.path.exists(GATE):
        with open(GATE + ".entered", "a") as entered:
            entered.write(f"{len(prompts)}\n")
        while os.path.exists(GATE):
            time.sleep(0.02)
    if POISON and any(POISON in prompt for prompt in prompts):
        raise torch.OutOfMemoryError("simulated: CUDA out of memory. Tried to allocate 20.00 GiB")
    if not GATE:
        return _real_call(self, *args, **kwargs)
    steps = 0
    user_callback = kwargs.get("callback_on_step_end")

    def counting(pipeline, step, timestep, callback_kwargs):
        nonlocal steps
        steps += 1
        result = user_callback(pipeline, step, timestep, callback_kwargs) if user_callback else callback_kwargs
        _hold_if_asked(steps)
        return result

    try:
        return _real_call(self, *args, **{**kwargs, "callback_on_step_end": counting})
    finally:
        with open(GATE + ".steps", "a") as log:
            log.write(f"{prompts[0] if prompts else ''}\t{steps}\n")


def _hold_if_asked(steps: int) -> None:
    hold = GATE + ".hold-after-step"
    try:
        wanted = int(open(hold).read() or 0)
    except (OSError, ValueError):
        return
    if steps == wanted:
        with open(GATE + ".held-at-step", "w") as held:
            held.write(str(steps))
        while os.path.exists(hold):
            time.sleep(0.02)


def _slow_load(cls, *args, **kwargs):
    if SLOW_LOADS in str(args[0] if args else kwargs.get("pretrained_model_or_path", "")):
        time.sleep(LOAD_DELAY_S)
    return _real_load(cls, *args, **kwargs)


diffusers.StableDiffusionPipeline.__call__ = _hooked_call
if LOAD_DELAY_S:
    diffusers.AutoPipelineForText2Image.from_pretrained = classmethod(_slow_load)
