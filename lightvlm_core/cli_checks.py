"""Checks of `lightvlm` arguments that run before any model loads (torch-free: app/cli.py uses it).

A user error (a bad flag value, a missing file, an unknown profile, more images than the model's
context holds) is one line on stderr and exit status 2, never a traceback. Exit statuses of every
subcommand: 0 done, 1 failed at run time (the model did not load, generation failed), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# org/name or name, as on the Hugging Face hub
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Room for the chat template and a short question next to the image tokens.
_PROMPT_ROOM_TOKENS = 16


class UsageError(Exception):
    """A user error found before any work starts: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block) that points at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def fail(prog: str, exc: UsageError) -> int:
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return EXIT_USAGE


# ---- argparse `type=` functions: a bad value is reported by the parser, before anything loads ----


def _number(parse: Callable[[str], float], ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    convert.__name__ = what  # argparse names the type in its messages
    return convert


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
port_number = _number(int, lambda v: 0 <= v <= 65535, "a port number (0-65535)")
keep_ratio = _number(float, lambda v: 0 < v <= 1, "a ratio in (0, 1]")
temperature = _number(float, lambda v: 0 <= v <= 2, "a temperature in [0, 2]")
top_p = _number(float, lambda v: 0 < v <= 1, "a probability in (0, 1]")


def kv_budget(minimum: int) -> Callable[[str], float]:
    """--kv-budget: 0 (off) or at least `minimum` entries (lightvlm_core.types.MIN_KV_BUDGET)."""
    return _number(int, lambda v: v == 0 or v >= minimum, f"0 (off) or an integer >= {minimum}")


# ---- checks that look at files ------------------------------------------------------------------


def check_model(model: str | None) -> None:
    """A local model must be a directory with a config.json; anything else must look like a hub id."""
    if model is None:
        return
    path = Path(model).expanduser()
    if path.exists() or model.startswith(("/", ".", "~")):
        if not path.is_dir():
            raise UsageError(f"--model {model}: no such model directory")
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {model}: the directory has no config.json (not a Hugging Face model)")
        return
    if not _HUB_ID.match(model):
        raise UsageError(f"--model {model}: neither a local directory nor a hub id like org/name")


def check_images(paths: Sequence[str]) -> None:
    """Each image exists and is a picture that Pillow can read."""
    from PIL import Image, UnidentifiedImageError

    for name in paths:
        path = Path(name).expanduser()
        if not path.is_file():
            raise UsageError(f"--image {name}: no such file")
        try:
            with Image.open(path) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise UsageError(f"--image {name}: not a readable image ({exc})") from None


def check_output(flag: str, name: str | None) -> None:
    """--out/--plot: the file's folder must exist, so a long run does not fail at its very end."""
    if name is not None and not Path(name).expanduser().resolve().parent.is_dir():
        raise UsageError(f"{flag} {name}: the folder {Path(name).parent} does not exist")


def check_images_fit(model_dir: Path, num_images: int) -> None:
    """Fixed-size image models (LLaVA) need a known number of tokens per image: refuse more images
    than the model's context holds (the demo model: 256 per image, 512 in all)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return  # not ours to judge here: the loader reports it
    per_image = config.get("image_seq_length")
    context = (config.get("text_config") or {}).get("max_position_embeddings")
    if not (isinstance(per_image, int) and isinstance(context, int) and num_images > 0):
        return  # dynamic-resolution families: the engine checks the real prompt length
    if num_images * per_image + _PROMPT_ROOM_TOKENS > context:
        fits = max(0, (context - _PROMPT_ROOM_TOKENS) // per_image)
        raise UsageError(
            f"{num_images} images need {num_images * per_image} image tokens ({per_image} each) but the "
            f"model's context is {context} tokens: use at most {fits} --image"
        )


def local_model_dir(model: str | None) -> Path | None:
    """The directory that `--model` (or its default) names, if it is a local one."""
    from lightvlm_core.loading import default_model

    path = Path(model or default_model()).expanduser()
    return path if path.is_dir() else None


def check_profile(kind: str, profile: str | None, profiles: Sequence[str]) -> None:
    if profile is not None and profile not in profiles:
        raise UsageError(f"unknown {kind} profile {profile!r}; choose one of: {', '.join(profiles)}")
