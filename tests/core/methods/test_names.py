"""Every registered name is accepted by the HTTP schemas, the settings and the CLI; an unknown one
is refused with the valid names listed (the HTTP layer turns the ValidationError into a 422)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.schemas import AccelerationOverride, GenerateRequest
from lightvlm_core.cli import _parser
from lightvlm_core.types import kv_policy_names, preset_names

METHODS = ("none", "light", "balanced", "aggressive", "fastv", "pdrop", "visionzip", "divprune", "cdpruner",
           "random")


def test_the_registry_names_every_documented_method_and_policy():
    assert set(METHODS) <= set(preset_names())
    assert set(kv_policy_names()) == {"heavy_hitter", "streaming", "snapkv", "pyramidkv"}


@pytest.mark.parametrize("name", preset_names())
def test_http_schema_and_cli_accept_every_preset(name):
    body = GenerateRequest(prompt="hi", acceleration={"preset": name, "keep_ratio": 0.1})
    assert body.acceleration.preset == name
    args = _parser().parse_args(["generate", "--prompt", "hi", "--preset", name, "--keep-ratio", "0.1"])
    assert args.preset == name


@pytest.mark.parametrize("policy", kv_policy_names())
def test_http_schema_and_cli_accept_every_kv_policy(policy):
    assert AccelerationOverride(kv_budget=64, kv_policy=policy).kv_policy == policy
    args = _parser().parse_args(["generate", "--prompt", "hi", "--kv-budget", "64", "--kv-policy", policy])
    assert args.kv_policy == policy


@pytest.mark.parametrize("field, names", [("preset", preset_names()), ("kv_policy", kv_policy_names())])
def test_unknown_names_are_refused_listing_the_valid_ones(field, names):
    with pytest.raises(ValidationError) as info:
        AccelerationOverride(**{field: "nope"})
    assert all(f"'{name}'" in str(info.value) for name in names)
    with pytest.raises(SystemExit):
        _parser().parse_args(["generate", "--prompt", "hi", f"--{field.replace('_', '-')}", "nope"])
