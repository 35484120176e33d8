"""The registry of token-reduction methods: the one list the CLI, HTTP schemas, settings and eval read.

Torch-free on purpose (the API process imports it): each entry names the module and class of a
method, loaded on first use. Adding a method = one new file in this package + one line here.
`register()` adds a method at run time (tests use it for an example method that is not shipped).
"""

from __future__ import annotations

import importlib

# LightVLM configurations: (layer, keep) stages, keep relative to the original image-token count,
# a layer < 1 is a fraction of depth. `none` reduces nothing (unless a keep_ratio is given).
PRESET_STAGES: dict[str, tuple[tuple[float, float], ...]] = {
    "light": ((0.1, 0.7), (0.25, 0.5), (0.5, 0.35)),
    "balanced": ((0.1, 0.5), (0.25, 0.25), (0.5, 0.1)),
    "aggressive": ((0.06, 0.3), (0.125, 0.1), (0.25, 0.03)),
}
LIGHTVLM_PRESETS = ("none", *PRESET_STAGES)

# name -> "module:Class" (modules relative to this package)
_METHODS: dict[str, str] = {
    "lightvlm": "lightvlm:LightVLM",  # the pyramid itself, at any keep_ratio
    "fastv": "fastv:FastV",
    "pdrop": "pdrop:PyramidDrop",
    "random": "random_drop:RandomDrop",
    "visionzip": "visionzip:VisionZip",
    "divprune": "divprune:DivPrune",
    "cdpruner": "cdpruner:CDPruner",
}
_RUNTIME: dict[str, type] = {}  # methods registered at run time


def method_names() -> tuple[str, ...]:
    """Every reduction method (LightVLM and the baselines), in registry order."""
    return (*_METHODS, *_RUNTIME)


def preset_names() -> tuple[str, ...]:
    """Every valid `preset`: the LightVLM presets, then every method name."""
    return (*LIGHTVLM_PRESETS, *(m for m in method_names() if m not in LIGHTVLM_PRESETS))


def method_class(name: str) -> type:
    """The dataclass of method `name` (imports its module on first use); KeyError if unknown."""
    if name in _RUNTIME:
        return _RUNTIME[name]
    module, cls = _METHODS[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


def register(name: str, cls: type) -> None:
    """Add a method at run time (e.g. in a test); `unregister` removes it."""
    if name in _METHODS or name in LIGHTVLM_PRESETS:
        raise ValueError(f"{name!r} is already a method or preset")
    _RUNTIME[name] = cls


def unregister(name: str) -> None:
    _RUNTIME.pop(name, None)
