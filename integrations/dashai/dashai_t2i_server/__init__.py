"""A DashAI model plugin whose images are made on a t2i-task inference server."""
