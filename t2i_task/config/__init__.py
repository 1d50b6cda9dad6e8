"""Configuration, the bottom layer: settings, sizes and cost, all a request is validated against; imports nothing of t2i_task."""
