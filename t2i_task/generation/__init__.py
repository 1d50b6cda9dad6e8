"""Where a prompt becomes pixels: the diffusers runner, previews, the tiny model, calibration; imports only t2i_task.config."""
