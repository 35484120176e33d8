"""The deployment files the static checks read (test_dockerfile.py, test_compose.py,
test_dashboard.py), the service contract they hold them to, and readers for the Dockerfile and
the compose files."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import yaml

from promql import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
COMPOSE = REPO_ROOT / "docker-compose.yml"
COMPOSE_CPU = REPO_ROOT / "docker" / "compose.cpu.yml"
PROMETHEUS_YML = REPO_ROOT / "docker" / "prometheus" / "prometheus.yml"
GRAFANA = REPO_ROOT / "docker" / "grafana"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())

SERVE_COMMAND = ["lightvlm", "serve", "--host", "0.0.0.0", "--port", "8000"]
SERVICE_PORT = 8000


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---- Dockerfile parsing ---------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines inside continuations as well
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, rest = buf.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def dockerfile_stages() -> tuple[dict[str, str], list[dict]]:
    """Global ARG defaults, and the stages: {"base", "alias", "instructions"}."""
    global_args: dict[str, str] = {}
    stages: list[dict] = []
    for keyword, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m, rest
            stages.append({"base": m.group(1), "alias": m.group(2), "instructions": []})
        elif not stages:
            assert keyword == "ARG", f"only ARG may precede the first FROM, found {keyword}"
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            stages[-1]["instructions"].append((keyword, rest))
    return global_args, stages


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def stage(alias: str) -> dict:
    _, stages = dockerfile_stages()
    found = [s for s in stages if s["alias"] == alias]
    assert found, f"no stage named {alias}"
    return found[0]


def instructions_of(st: dict, keyword: str) -> list[str]:
    return [rest for kw, rest in st["instructions"] if kw == keyword]


def env_of(st: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in instructions_of(st, "ENV"):
        for token in shlex.split(rest):
            key, _, value = token.partition("=")
            env[key] = value
    return env


def stage_args(st: dict) -> dict[str, str]:
    args = {}
    for rest in instructions_of(st, "ARG"):
        name, _, default = rest.partition("=")
        args[name] = default
    return args


def shell_commands(run_args: str) -> list[list[str]]:
    """The simple commands of a RUN line (its --mount flags removed), split on && and ;."""
    text = re.sub(r"^(--\S+\s+)+", "", run_args)
    commands, current = [], []
    for token in shlex.split(text, posix=True):
        if token in ("&&", ";", "||"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def pip_installs() -> list[tuple[dict, list[str]]]:
    """(stage, argv after `pip install`) for every pip install the Dockerfile runs."""
    _, stages = dockerfile_stages()
    out = []
    for st in stages:
        for rest in instructions_of(st, "RUN"):
            for argv in shell_commands(rest):
                if argv[:2] == ["pip", "install"] or argv[:4] == ["python3", "-m", "pip", "install"]:
                    out.append((st, argv[argv.index("install") + 1:]))
    return out


def requirement_name(spec: str) -> str:
    return re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0].lower().replace("_", "-")


# ---- docker-compose -------------------------------------------------------------------------------


def compose_env(service: dict) -> dict[str, str | None]:
    env = service.get("environment", {})
    if isinstance(env, dict):
        return env
    return {k: (v if sep else None) for k, sep, v in (e.partition("=") for e in env)}


def container_ports(service: dict) -> set[int]:
    return {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}


def mounts(service: dict) -> dict[str, str]:
    """container path -> source for the service's short-syntax volumes."""
    out = {}
    for v in service.get("volumes", []):
        source, target = v.split(":")[:2]
        out[target] = source
    return out
