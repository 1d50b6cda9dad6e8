"""Loaded by `bench/progress_cost.py`'s "off" server: no progress reporting at all.

The model worker makes its pipeline calls without a step callback, and the API
process never asks the model how far it is (nor writes it to the database).
"""

import t2i_task.generation.runner
import t2i_task.jobs.progress


async def _no_watching(self, stopping) -> None:
    return None


t2i_task.generation.runner.DiffusionRunner._step_callback = lambda self, *call: None
t2i_task.jobs.progress.ProgressWatch.watch = _no_watching
