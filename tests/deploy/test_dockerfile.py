"""Static checks of the image: the Dockerfile, what `.dockerignore` sends, and the packaging
(pyproject.toml) the image installs. Nothing here needs a Docker engine."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_files import (  # noqa: E402
    DOCKERIGNORE,
    PYPROJECT,
    SERVE_COMMAND,
    SERVICE_PORT,
    dockerfile_stages,
    env_of,
    expand,
    instructions_of,
    pip_installs,
    requirement_name,
    shell_commands,
    stage,
    stage_args,
)
from promql import REPO_ROOT  # noqa: E402

# Paths the image copies that other work items deliver; until they land the COPY check skips.
PENDING_SOURCES = {"README.md", "models/shapes-demo"}


# ---- Dockerfile -----------------------------------------------------------------------------------


def test_dockerfile_builds_gpu_by_default_and_cpu_by_build_arg():
    global_args, stages = dockerfile_stages()
    assert global_args.get("VARIANT") == "gpu"
    aliases = [s["alias"] for s in stages]
    assert {"os-gpu", "os-cpu", "builder", "runtime"} <= set(aliases)
    assert stages[-1]["alias"] == "runtime", "the runtime stage must be the default (last) target"
    # Multi-stage: the build tools stay in `builder`; both the builder and the runtime sit on the
    # OS layer the VARIANT build argument picks.
    assert stage("builder")["base"] == "os-${VARIANT}"
    assert stage("runtime")["base"] == "os-${VARIANT}"
    assert any(i.startswith("--from=builder ") for i in instructions_of(stage("runtime"), "COPY"))

    gpu_base = expand(stage("os-gpu")["base"], global_args)
    cpu_base = expand(stage("os-cpu")["base"], global_args)
    for base in (gpu_base, cpu_base):
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base
    assert env_of(stage("os-cpu")).get("LIGHTVLM_DEVICE") == "cpu"
    # The torch wheel brings CUDA; the NVIDIA container toolkit mounts the driver when asked.
    gpu_env = env_of(stage("os-gpu"))
    assert gpu_env.get("NVIDIA_VISIBLE_DEVICES") == "all"
    assert "compute" in gpu_env.get("NVIDIA_DRIVER_CAPABILITIES", "")


def test_base_images_are_pinned():
    global_args, stages = dockerfile_stages()
    aliases = {s["alias"] for s in stages}
    for st in stages:
        if st["base"] == "os-${VARIANT}":
            continue
        image = expand(st["base"], global_args)
        assert image not in aliases and "$" not in image, image
        name, _, tag = image.rpartition(":")
        assert name and re.search(r"\d+\.\d+\.\d+", tag) and tag != "latest", f"unpinned base {image}"


def test_images_run_the_tested_python():
    """Both variants run the Python version the test suite runs on."""
    global_args, _ = dockerfile_stages()
    tested = f"{sys.version_info.major}.{sys.version_info.minor}"
    for variant in ("os-gpu", "os-cpu"):
        tag = expand(stage(variant)["base"], global_args).split(":")[1]
        assert tag.startswith(tested + "."), (variant, tag, tested)


def test_runtime_stage_contract():
    rt = stage("runtime")
    env = env_of(rt)

    users = instructions_of(rt, "USER")
    assert users, "the service must not run as root"
    uid, _, gid = expand(users[-1], stage_args(rt)).partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER {users[-1]}: want a numeric non-root uid"
    assert not gid or (gid.isdigit() and int(gid) > 0), users[-1]
    assert str(SERVICE_PORT) in instructions_of(rt, "EXPOSE")

    entrypoint = json.loads(instructions_of(rt, "ENTRYPOINT")[-1])
    cmd = json.loads(instructions_of(rt, "CMD")[-1])
    assert entrypoint + cmd == SERVE_COMMAND
    script = SERVE_COMMAND[0]
    assert script in PYPROJECT["project"]["scripts"], "the image runs the project's console script"

    healthcheck = instructions_of(rt, "HEALTHCHECK")
    assert len(healthcheck) == 1
    assert f"127.0.0.1:{SERVICE_PORT}/ready" in healthcheck[0]  # healthy = ready, not just alive

    # A volume for the HuggingFace cache, where HF_HOME points.
    volumes = [v for rest in instructions_of(rt, "VOLUME") for v in json.loads(rest)]
    assert env.get("HF_HOME") in volumes

    # The bundled demo model is copied in and is the default model.
    workdir = instructions_of(rt, "WORKDIR")[-1]
    copies = [shlex.split(c) for c in instructions_of(rt, "COPY") if not c.startswith("--")]
    demo_targets = [Path(workdir, c[-1]).resolve() for c in copies if c[0] == "models/shapes-demo"]
    assert demo_targets and env.get("LIGHTVLM_MODEL") == str(demo_targets[0])


def test_pip_commands_match_pyproject():
    installs = pip_installs()
    assert installs, "the Dockerfile installs nothing with pip"
    forbidden = {"-e", "--editable", "-i", "--index-url", "--extra-index-url", "-f", "--find-links",
                 "--no-deps", "--pre", "--no-index"}
    deps = {requirement_name(d): d for d in PYPROJECT["project"]["dependencies"]}
    projects = []
    for st, argv in installs:
        assert not forbidden & set(argv), f"pip install {' '.join(argv)}: not what the tests install"
        for arg in argv:
            if arg.startswith("-") or arg == "/tmp/requirements.txt":
                continue
            if arg == ".":
                projects.append(st)
                continue
            name = requirement_name(arg)
            if name == "pip":  # pinning pip itself is fine, to an exact version
                pip_version = expand(arg, {**stage_args(st)})
                assert re.fullmatch(r"pip==\d+(\.\d+)+", pip_version), pip_version
                continue
            assert name in deps, f"{arg} is not a dependency in pyproject.toml"
            assert arg.replace(" ", "") == deps[name].replace(" ", ""), (arg, deps[name])
        if "-r" in argv:
            assert argv[argv.index("-r") + 1] == "/tmp/requirements.txt"
    # The project itself, exactly once, non-editable and without extras, in the builder.
    assert [s["alias"] for s in projects] == ["builder"]


def test_requirements_layer_is_pyproject_dependencies(tmp_path):
    """The cached dependency layer installs exactly [project].dependencies of pyproject.toml."""
    for rest in instructions_of(stage("builder"), "RUN"):
        for argv in shell_commands(rest):
            if argv[:2] == ["python3", "-c"] and "tomllib" in argv[2]:
                code = argv[2]
                break
        else:
            continue
        break
    else:
        pytest.fail("no python3 -c step that reads pyproject.toml")
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines() == PYPROJECT["project"]["dependencies"]
    # ...and it runs in the builder before the sources are copied (so it caches across edits).
    order = [(kw, rest) for kw, rest in stage("builder")["instructions"] if kw in ("COPY", "RUN")]
    dep_step = next(i for i, (kw, rest) in enumerate(order) if kw == "RUN" and "tomllib" in rest)
    copied_before = [rest for kw, rest in order[:dep_step] if kw == "COPY"]
    assert copied_before == ["pyproject.toml ./"]


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics for the patterns used here (last match wins; a pattern
    that matches a folder covers everything inside)."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = re.sub(r"\\\[(.*?)\\\]", r"[\1]", regex)
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_what_the_image_copies():
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
                if ln.strip() and not ln.strip().startswith("#")]
    _, stages = dockerfile_stages()
    sources = []
    for st in stages:
        for rest in instructions_of(st, "COPY"):
            if rest.startswith("--from"):
                continue
            sources += [s.rstrip("/") for s in shlex.split(rest)[:-1] if not s.startswith("--")]
    pending = []
    for src in sources:
        probe = src if (REPO_ROOT / src).is_file() else f"{src}/some_file.py"
        assert not dockerignore_excludes(probe, patterns), f".dockerignore hides COPY source {src}"
        if not (REPO_ROOT / src).exists():
            pending.append(src)
    for kept in ("pyproject.toml", "app/main.py", "lightvlm_core/engine.py",
                 "models/shapes-demo/model.safetensors"):
        assert not dockerignore_excludes(kept, patterns), kept
    for dropped in (".venv/bin/python", ".git/HEAD", "runs/x.json", "tests/conftest.py",
                    "app/__pycache__/main.cpython-312.pyc", "models/other/model.safetensors",
                    "lightvlm_serve.egg-info/PKG-INFO"):
        assert dockerignore_excludes(dropped, patterns), dropped
    missing = set(pending) - PENDING_SOURCES
    assert not missing, f"COPY sources missing from the repo: {sorted(missing)}"
    if pending:
        pytest.skip(f"COPY sources not in the repo yet: {sorted(pending)}")


def test_every_kernel_source_is_package_data():
    """The C++ kernels are built from the installed package on first use: every file of
    lightvlm_core/kernels (sources and the headers they include) must ship in the wheel."""
    from fnmatch import fnmatch

    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["lightvlm_core"]
    kernels = REPO_ROOT / "lightvlm_core" / "kernels"
    files = [p.relative_to(kernels.parent).as_posix() for p in kernels.iterdir() if p.is_file()]
    assert any(f.endswith(".h") for f in files)
    assert [f for f in files if not any(fnmatch(f, pattern) for pattern in patterns)] == []
