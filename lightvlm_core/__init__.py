"""LightVLM engine: VLM inference with pyramid token merging and KV-cache compression."""

__version__ = "0.1.0"
