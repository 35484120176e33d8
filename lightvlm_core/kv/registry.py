"""The registry of KV eviction policies (torch-free: the API process reads the names).

Adding a policy = one new file in this package + one line here.
"""

from __future__ import annotations

import importlib

DEFAULT_KV_POLICY = "heavy_hitter"

_POLICIES: dict[str, str] = {  # name -> "module:Class" (modules relative to this package)
    "heavy_hitter": "heavy_hitter:HeavyHitter",
    "streaming": "streaming:Streaming",
    "snapkv": "snapkv:SnapKV",
    "pyramidkv": "pyramidkv:PyramidKV",
}


def kv_policy_names() -> tuple[str, ...]:
    return tuple(_POLICIES)


def kv_policy(name: str | None):
    """A default-configured instance of policy `name` (None: the default); KeyError if unknown."""
    module, cls = _POLICIES[name or DEFAULT_KV_POLICY].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)()
