"""Every `lightvlm` user error: one line on stderr, exit status 2, no traceback, and reported before
any model loads (loading is made to fail the test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import lightvlm_core.loading as loading
from app.cli import main as app_main
from lightvlm_core.cli import _parser
from lightvlm_core.cli import main as core_main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_model", refuse)


@pytest.fixture
def white_png(tmp_path: Path) -> str:
    path = tmp_path / "white.png"
    Image.new("RGB", (112, 112), (255, 255, 255)).save(path)
    return str(path)


def run(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:  # noqa: ANN001
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return code, capsys.readouterr().err


CASES = [
    (["bench", "prefill", "--profile", "nope"], "unknown prefill profile 'nope'; choose one of: cpu-small"),
    (["bench", "decode", "--profile", "gpu-26b-vs-8b"], "unknown decode profile"),
    (["bench", "prefill", "--plot", "/no/such/dir/p.png"], "--plot /no/such/dir/p.png: the folder"),
    (["generate", "--prompt", "hi", "--kv-budget", "8"], "--kv-budget: '8' is not 0 (off) or an integer >= 16"),
    (["generate", "--prompt", "hi", "--keep-ratio", "1.5"], "--keep-ratio: '1.5' is not a ratio in (0, 1]"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens: '0' is not an integer >= 1"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature: '-1' is not a temperature"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "--top-p: '0' is not a probability"),
    (["generate", "--prompt", "hi", "--image", "/no/such.png"], "--image /no/such.png: no such file"),
    (["generate", "--prompt", "hi", "--image", __file__], "not a readable image"),
    (["generate", "--prompt", "hi", "--model", "/no/such/model"], "--model /no/such/model: no such model directory"),
    (["generate", "--prompt", "hi", "--model", str(ROOT)], "the directory has no config.json"),
    (["generate", "--prompt", "hi", "--model", "not a hub id!"], "neither a local directory nor a hub id"),
    (["generate"], "the following arguments are required: --prompt"),
    (["generate", "--prompt", "hi", "--preset", "fastest"], "argument --preset: invalid choice: 'fastest'"),
    (["eval", "--num-questions", "-5"], "--num-questions: '-5' is not an integer >= 1"),
    (["eval", "--out", "/no/such/dir/r.json"], "--out /no/such/dir/r.json: the folder"),
    (["make-scene", "--out", "/no/such/dir/s.png"], "--out /no/such/dir/s.png: the folder"),
    (["make-tiny", "--family", "gpt2", "--out", "x"], "argument --family: invalid choice: 'gpt2'"),
    (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[" ".join(a)[:40] for a, _ in CASES])
def test_core_user_error_is_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(core_main, argv, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("lightvlm") and "Traceback" not in err, err
    assert message in err


def test_two_images_beyond_the_demo_context(white_png: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(core_main, ["generate", "--prompt", "Describe the image.", "--image", white_png,
                                "--image", white_png], capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert "2 images need 512 image tokens (256 each) but the model's context is 512 tokens" in err
    assert "use at most 1 --image" in err


SERVE_CASES = [
    (["serve", "--model", "/no/such/model"], "--model /no/such/model: no such model directory"),
    (["serve", "--port", "99999"], "--port: '99999' is not a port number"),
    (["serve", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["serve", "--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize(("argv", "message"), SERVE_CASES, ids=[" ".join(a) for a, _ in SERVE_CASES])
def test_serve_user_error_is_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(app_main, argv, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("lightvlm serve: error:") and message in err, err


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("LIGHTVLM_MAX_BATCH_SIZE", "0", "LIGHTVLM_MAX_BATCH_SIZE: Input should be greater than or equal to 1"),
    ("LIGHTVLM_DEVICE", "tpu", "LIGHTVLM_DEVICE: Input should be 'auto', 'cpu' or 'cuda'"),
])
def test_serve_bad_environment_is_one_line(variable: str, value: str, message: str,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(variable, value)
    code, err = run(app_main, ["serve"], capsys)
    assert code == 2 and err == f"lightvlm serve: error: {message}\n"


def test_every_flag_has_help() -> None:
    from app.cli import serve_parser

    parsers = [serve_parser()]
    for action in _parser()._subparsers._group_actions:  # noqa: SLF001
        parsers.extend(action.choices.values())
    for parser in parsers:
        for action in parser._actions:  # noqa: SLF001
            if action.dest != "help":
                assert action.help, f"{parser.prog} {action.option_strings or action.dest} has no help"


def test_bench_profile_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert core_main(["bench", "prefill", "--profile", "list"]) == 0
    names = capsys.readouterr().out.split()
    assert "cpu-small" in names and "gpu-26b-vs-8b" in names


def test_console_script_prints_no_traceback() -> None:
    """The installed `lightvlm` command, as a user runs it."""
    script = Path(sys.executable).parent / "lightvlm"
    proc = subprocess.run([str(script), "bench", "prefill", "--profile", "nope"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
