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
"""

import os
import time

import diffusers
import torch

GATE = os.environ.get("T2I_TEST_GATE")
POISON = os.environ.get("T2I_TEST_POISON")
_real_call = diffusers.StableDiffusionPipeline.__call__


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
        return user_callback(pipeline, step, timestep, callback_kwargs) if user_callback else callback_kwargs

    try:
        return _real_call(self, *args, **{**kwargs, "callback_on_step_end": counting})
    finally:
        with open(GATE + ".steps", "a") as log:
            log.write(f"{prompts[0] if prompts else ''}\t{steps}\n")


diffusers.StableDiffusionPipeline.__call__ = _hooked_call
