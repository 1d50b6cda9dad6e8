"""How work moves from a request to the model and back: queue, live calls, scheduler, progress; imports config, generation, storage, task."""
