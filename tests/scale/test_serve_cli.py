"""`lightvlm` console script: `serve` is handled by app.cli, everything else by the core CLI."""

from __future__ import annotations

import pytest

from app import cli


def test_other_subcommands_go_to_the_core_cli(tmp_path, capsys):
    assert cli.main(["make-tiny", "--family", "llava", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").exists()


def test_top_level_help_names_serve(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "lightvlm serve" in out and "make-tiny" in out


def test_replica_options_need_ray(capsys):
    assert cli.main(["serve", "--replicas", "2"]) == 2
    assert "need --ray" in capsys.readouterr().err


def test_serve_choices_follow_settings():
    parser = cli.serve_parser()
    preset = next(a for a in parser._actions if a.dest == "preset")
    assert "balanced" in preset.choices and "none" in preset.choices
