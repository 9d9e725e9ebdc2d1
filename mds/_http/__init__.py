"""Transports: the HTTP adapters and the Open Inference Protocol."""
