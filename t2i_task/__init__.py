"""DashAI's text-to-image task as an inference server, one folder per layer, each importing only those below it.

    api/         the HTTP surface: DashAI's API, OpenAI's, error shapes, ASGI guards
    jobs/        how work moves: stored processes, live calls, the scheduler, model calls
    task.py      DashAI's contract: stored rows <-> prompt, images -> files and rows
    generation/  where a prompt becomes pixels (diffusers, torch)  |  storage/  what is kept (SQL)
    config/      settings, sizes and cost: what a request is validated against

`local_server.py` starts the whole server for tests and benchmarks; `service.py`, beside
the package, wires the layers into BentoML services. tests/test_layers.py keeps the order.
"""
