"""Serving a build: the OpenAI-compatible HTTP server and the continuous batcher behind it."""
