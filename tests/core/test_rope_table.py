"""The decode step's rotary tables by lookup (lightvlm_core/rope_table.py): exactly the model's rotary
module's values, growing with the positions; not used where the tables are not a function of the
position alone, nor after a spot check that differs."""

from __future__ import annotations

import logging

import pytest
import torch

from lightvlm_core.forward import RopeTables
from lightvlm_core.rope_table import FIRST_SIZE, RopeTable
from lightvlm_core.runner import load_runner


@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    return load_runner(str(tiny_model_dir("llava")), device="cpu").adapter


def computed(adapter, h: torch.Tensor, pos: torch.Tensor) -> RopeTables:
    """As a decode step computes them without the table."""
    return RopeTables.build(*adapter.rotary(h, pos[..., None], None))


def test_lookups_equal_the_rotary_module_bitwise_and_the_table_grows(adapter) -> None:
    table = RopeTable(adapter)
    h = torch.zeros(3, 1, adapter.model.config.text_config.hidden_size)
    for pos in ([0, 7, 300], [FIRST_SIZE - 1, 5, FIRST_SIZE + 10], [9, 4 * FIRST_SIZE + 1, 2]):
        pos = torch.tensor(pos)
        got, expected = table.lookup(h, pos), computed(adapter, h, pos)
        assert torch.equal(got.cos, expected.cos) and torch.equal(got.signed_sin, expected.signed_sin)
    assert table.cos.shape[0] == 8 * FIRST_SIZE


def test_the_runner_uses_it_where_it_applies(tiny_model_dir) -> None:
    for family, applies in (("llava", True), ("llava_onevision", True), ("qwen2_vl", False), ("gemma3", False)):
        runner = load_runner(str(tiny_model_dir(family)), device="cpu")
        assert (runner.rope_table is not None) == applies, family


def test_a_spot_check_that_differs_turns_it_off(adapter, monkeypatch, caplog) -> None:
    table = RopeTable(adapter)
    real = adapter.rotary

    def off_by_a_bit(x, position_ids, rope=None):  # differs only when asked one position at a time
        cos, sin = real(x, position_ids, rope)
        return (cos * 1.0001, sin) if position_ids.shape[-1] == 1 else (cos, sin)

    monkeypatch.setattr(adapter, "rotary", off_by_a_bit)
    h = torch.zeros(1, 1, adapter.model.config.text_config.hidden_size)
    with caplog.at_level(logging.WARNING, logger="lightvlm_core.rope_table"):
        assert table.lookup(h, torch.tensor([3])) is None
    assert table.failed and "not used" in caplog.text
    monkeypatch.setattr(adapter, "rotary", real)
    assert table.lookup(h, torch.tensor([3])) is None  # for good
