"""The HTTP surface, one module per API a client speaks, their error shape and the ASGI guards; imports every layer below, never service.py."""
