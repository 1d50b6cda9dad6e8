"""The HTTP APIs, one module per API a client speaks; `service.py` mounts them."""
