"""Static checks of the deployment files: Dockerfile, compose stack, Prometheus and Grafana.

Nothing here needs a Docker engine. The external validators (Debian's `docker-compose` and
`promtool` from the `prometheus` package) are skipped only on a developer machine without them;
under CI (CI=true) .ci/run installs them and a missing one is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from promql import (  # noqa: E402
    CONTRACT_METRICS,
    DASHBOARD_METRICS,
    DASHBOARD_PATH,
    REPO_ROOT,
    dashboard_queries,
    exposed_series_names,
    iter_panels,
    load_dashboard,
    metric_names,
    substitute,
)
from tools import require_tool  # noqa: E402

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
COMPOSE = REPO_ROOT / "docker-compose.yml"
COMPOSE_CPU = REPO_ROOT / "docker" / "compose.cpu.yml"
PROMETHEUS_YML = REPO_ROOT / "docker" / "prometheus" / "prometheus.yml"
GRAFANA = REPO_ROOT / "docker" / "grafana"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())

SERVE_COMMAND = ["lightvlm", "serve", "--host", "0.0.0.0", "--port", "8000"]
SERVICE_PORT = 8000
# Paths the image copies that other work items deliver; until they land the COPY check skips.
PENDING_SOURCES = {"README.md", "models/shapes-demo"}


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


def test_compose_stack_structure():
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert {"lightvlm", "prometheus", "grafana"} <= set(services)

    svc = services["lightvlm"]
    assert svc["build"]["context"] == "."
    assert svc["build"]["args"]["VARIANT"] == "gpu"
    assert "profiles" not in svc, "`docker compose up` must start the GPU service"
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    env = compose_env(svc)
    assert "LIGHTVLM_MODEL" in env
    # The HuggingFace cache volume is mounted where the image's HF_HOME points.
    hf_home = env_of(stage("runtime"))["HF_HOME"]
    assert mounts(svc).get(hf_home) in compose["volumes"]
    assert container_ports(svc) == {SERVICE_PORT}

    assert container_ports(services["prometheus"]) == {9090}
    assert container_ports(services["grafana"]) == {3000}
    for name in ("prometheus", "grafana"):
        assert re.search(r":v?\d+\.\d+\.\d+$", services[name]["image"]), services[name]["image"]
        assert "depends_on" not in services[name] or "lightvlm" not in services[name]["depends_on"]

    prom = mounts(services["prometheus"])
    assert prom["/etc/prometheus/prometheus.yml"] == "./docker/prometheus/prometheus.yml"
    graf = mounts(services["grafana"])
    assert graf["/etc/grafana/provisioning"] == "./docker/grafana/provisioning"
    for source in {**prom, **graf}.values():
        if source.startswith("./"):
            assert (REPO_ROOT / source).exists(), source

    genv = compose_env(services["grafana"])
    assert genv["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert genv["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert "GF_SECURITY_ADMIN_PASSWORD" in genv


def test_compose_health_is_readiness():
    """`docker compose ps` says healthy only once /ready does (the model loaded and warmed up)."""
    cpu_stack = load_yaml(REPO_ROOT / "docker" / "compose.cpu.yml")
    stacks = (load_yaml(COMPOSE)["services"]["lightvlm"], cpu_stack["services"]["lightvlm-cpu"])
    for service in stacks:
        check = service["healthcheck"]
        assert any(f"127.0.0.1:{SERVICE_PORT}/ready" in part for part in check["test"]), check
        assert check["start_period"] == "15m"  # a first start downloads the hub model


def test_compose_cpu_override():
    override = load_yaml(COMPOSE_CPU)["services"]
    assert override["lightvlm"] == {"profiles": ["gpu"]}, "the override only parks the GPU service"
    cpu = override["lightvlm-cpu"]
    assert cpu["build"]["args"]["VARIANT"] == "cpu"
    assert "deploy" not in cpu
    assert "lightvlm" in cpu["networks"]["default"]["aliases"], "Prometheus scrapes host `lightvlm`"
    env = compose_env(cpu)
    assert env["LIGHTVLM_DEVICE"] == "cpu"
    assert env_of(stage("runtime"))["LIGHTVLM_MODEL"] in env["LIGHTVLM_MODEL"]
    assert container_ports(cpu) == {SERVICE_PORT}
    # Same settings pass-through as the GPU service.
    gpu_env = compose_env(load_yaml(COMPOSE)["services"]["lightvlm"])
    assert set(env) == set(gpu_env)


def run_compose_config(*files: Path) -> dict:
    binary = require_tool("docker-compose")
    argv = [binary]
    for f in files:
        argv += ["-f", str(f)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIGHTVLM_", "COMPOSE_"))}
    proc = subprocess.run(argv + ["config"], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_docker_compose_config_validates_gpu_stack():
    resolved = run_compose_config(COMPOSE)
    svc = resolved["services"]["lightvlm"]
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert compose_env(svc)["LIGHTVLM_MODEL"]


def test_docker_compose_config_validates_cpu_stack():
    resolved = run_compose_config(COMPOSE, COMPOSE_CPU)
    services = resolved["services"]
    assert services["lightvlm"]["profiles"] == ["gpu"]
    cpu = services["lightvlm-cpu"]
    assert "deploy" not in cpu
    assert compose_env(cpu)["LIGHTVLM_MODEL"] == env_of(stage("runtime"))["LIGHTVLM_MODEL"]
    assert Path(cpu["build"]["context"]) == REPO_ROOT


# ---- Prometheus -----------------------------------------------------------------------------------


def test_prometheus_scrapes_service_every_5s():
    config = load_yaml(PROMETHEUS_YML)
    jobs = [j for j in config["scrape_configs"]
            if any(f"lightvlm:{SERVICE_PORT}" in sc.get("targets", []) for sc in j.get("static_configs", []))]
    assert len(jobs) == 1
    job = jobs[0]
    interval = job.get("scrape_interval", config.get("global", {}).get("scrape_interval"))
    assert interval == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scheme", "http") == "http"


def test_promtool_check_config():
    promtool = require_tool("promtool")
    proc = subprocess.run([promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_parses_every_dashboard_expression(tmp_path):
    """Each panel query (variables substituted) is valid PromQL: checked as a recording rule."""
    promtool = require_tool("promtool")
    rules = [{"record": f"lightvlm_dashboard:q{i}", "expr": q.expr}
             for i, q in enumerate(dashboard_queries())]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- Grafana provisioning -------------------------------------------------------------------------


def test_grafana_datasource_points_at_compose_prometheus():
    files = sorted((GRAFANA / "provisioning" / "datasources").glob("*.yml"))
    assert files
    datasources = [d for f in files for d in load_yaml(f)["datasources"]]
    prom = [d for d in datasources if d["type"] == "prometheus"]
    assert len(prom) == 1 and prom[0]["isDefault"] is True
    assert prom[0]["url"] == "http://prometheus:9090"
    assert prom[0]["jsonData"]["timeInterval"] == load_yaml(PROMETHEUS_YML)["global"]["scrape_interval"]
    ds_var = next(v for v in load_dashboard()["templating"]["list"] if v["type"] == "datasource")
    assert ds_var["current"]["value"] == prom[0]["uid"]


def test_grafana_dashboard_provider_reads_mounted_folder():
    files = sorted((GRAFANA / "provisioning" / "dashboards").glob("*.yml"))
    assert files
    providers = [p for f in files for p in load_yaml(f)["providers"]]
    assert len(providers) == 1 and providers[0]["type"] == "file"
    path = providers[0]["options"]["path"]
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    assert mounts(grafana)[path] == "./docker/grafana/dashboards"
    home = compose_env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(path + "/")
    assert (REPO_ROOT / "docker/grafana/dashboards" / home[len(path) + 1:]) == DASHBOARD_PATH


# ---- dashboard ------------------------------------------------------------------------------------


def norm(expr: str) -> str:
    return re.sub(r"\s+", "", expr)


def panel(title: str) -> dict:
    found = [p for p in iter_panels(load_dashboard()) if p["title"] == title and p["type"] != "row"]
    assert len(found) == 1, f"expected one panel titled {title!r}, found {len(found)}"
    return found[0]


def panel_exprs(title: str) -> list[str]:
    return [norm(t["expr"]) for t in panel(title)["targets"]]


def quantile_expr(q: float, histogram: str) -> str:
    return norm(f'histogram_quantile({q}, sum by (le) (rate({histogram}_bucket{{model=~"$model"}}'
                f"[$__rate_interval])))")


def test_dashboard_json_is_generated_from_script():
    sys.path.insert(0, str(GRAFANA))
    try:
        import build_dashboard
    finally:
        sys.path.remove(str(GRAFANA))
    assert DASHBOARD_PATH.read_text() == build_dashboard.render(), (
        "lightvlm.json is stale: run `python docker/grafana/build_dashboard.py`")


def test_dashboard_has_model_variable():
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"]
    model = [v for v in dashboard["templating"]["list"] if v["name"] == "model"]
    assert len(model) == 1
    var = model[0]
    assert var["type"] == "query"
    assert var["definition"] == "label_values(lightvlm_model_info, model)"
    assert var["includeAll"] and var["allValue"] == ".*"


LATENCY_PANELS = {
    "Prefill latency": "lightvlm_prefill_seconds",
    "Time to first token": "lightvlm_time_to_first_token_seconds",
    "Inter-token latency": "lightvlm_inter_token_latency_seconds",
    "End-to-end request latency": "lightvlm_e2e_request_latency_seconds",
    "Queue time": "lightvlm_queue_time_seconds",
}


@pytest.mark.parametrize("title", sorted(LATENCY_PANELS))
def test_latency_panel_quantiles(title):
    histogram = LATENCY_PANELS[title]
    exprs = panel_exprs(title)
    for q in (0.5, 0.95, 0.99):
        assert quantile_expr(q, histogram) in exprs, (title, q)
    assert panel(title)["fieldConfig"]["defaults"]["unit"] == "s"


def rate_expr(counter: str, extra: str = "", by: str = "") -> str:
    matchers = 'model=~"$model"' + (f",{extra}" if extra else "")
    return norm(f"sum{f' by ({by})' if by else ''}(rate({counter}{{{matchers}}}[$__rate_interval]))")


REQUIRED_PANELS = {
    "Token throughput": [rate_expr("lightvlm_generation_tokens_total")],
    "Requests running / waiting": [norm('sum(lightvlm_requests_running{model=~"$model"})'),
                                   norm('sum(lightvlm_requests_waiting{model=~"$model"})')],
    "Batch size": [quantile_expr(0.5, "lightvlm_batch_size"), quantile_expr(0.95, "lightvlm_batch_size")],
    "KV-cache bytes": [norm('sum(lightvlm_kv_cache_bytes{model=~"$model"})')],
    "KV-cache tokens": [norm('sum(lightvlm_kv_cache_tokens{model=~"$model"})')],
    "KV entries evicted / s": [rate_expr("lightvlm_kv_cache_evicted_tokens_total")],
    "Image tokens kept ratio": [rate_expr("lightvlm_image_tokens_total", 'stage="kept"') + "/"
                                + rate_expr("lightvlm_image_tokens_total", 'stage="input"')],
    "Finish reasons": [rate_expr("lightvlm_requests_total", by="finish_reason")],
    "Rejections by reason": [rate_expr("lightvlm_requests_rejected_total", by="reason")],
}


@pytest.mark.parametrize("title", sorted(REQUIRED_PANELS))
def test_required_panel_queries(title):
    exprs = panel_exprs(title)
    for expected in REQUIRED_PANELS[title]:
        assert expected in exprs, (title, expected, exprs)


def test_panel_units():
    assert panel("KV-cache bytes")["fieldConfig"]["defaults"]["unit"] == "bytes"
    assert panel("Image tokens kept ratio")["fieldConfig"]["defaults"]["unit"] == "percentunit"


def test_every_queried_metric_is_in_the_contract():
    allowed = exposed_series_names(DASHBOARD_METRICS)  # the design doc's table + issue 18's two
    used = set()
    for q in dashboard_queries():
        names = metric_names(q.raw)
        assert names, f"{q.panel}/{q.ref_id}: no metric in {q.raw}"
        unknown = names - allowed
        assert not unknown, f"{q.panel}/{q.ref_id} queries non-contract metrics {unknown}"
        used |= names
    # ...and every contract metric is on the dashboard somewhere.
    for name, kind in DASHBOARD_METRICS.items():
        assert any(u.startswith(name) for u in used), f"{name} ({kind}) is on no panel"


def test_every_selector_filters_on_model():
    for q in dashboard_queries():
        for m in re.finditer(r"(?<![\w:])(lightvlm_\w+)(\{[^}]*\})?", q.raw):
            assert m.group(2) and 'model=~"$model"' in m.group(2), f"{q.panel}: {m.group(0)}"


def test_grid_layout_has_no_overlaps():
    cells: dict[tuple[int, int], int] = {}
    ids, titles = set(), set()
    for p in iter_panels(load_dashboard()):
        assert p["id"] not in ids and p["title"] not in titles, p["title"]
        ids.add(p["id"])
        titles.add(p["title"])
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {p['id']} overlap"
                cells[(x, y)] = p["id"]


# ---- promql helper --------------------------------------------------------------------------------


def test_promql_helper_substitutes_and_extracts():
    queries = dashboard_queries()
    assert len(queries) >= 20
    for q in queries:
        assert "$" not in q.expr
        if "rate(" in q.expr:
            assert "[1m]" in q.expr
        assert 'model=~".*"' in q.expr
    assert substitute('x{model=~"${model}"}[$__rate_interval]') == 'x{model=~".*"}[1m]'
    with pytest.raises(KeyError):
        substitute("x{a=\"$unknown\"}")
    assert metric_names(
        'sum by (le) (rate(a_bucket{model=~".*",stage="in"}[1m])) / on (model) group_left b_total offset 5m'
    ) == {"a_bucket", "b_total"}
    assert metric_names('histogram_quantile(0.99, sum(rate(x_bucket[1m])) by (le))') == {"x_bucket"}


def test_contract_matches_architecture_doc():
    """The contract above is the table in the design doc (shared/ beside the repo or inside it)."""
    candidates = [REPO_ROOT / "shared/design/ARCHITECTURE.md",
                  REPO_ROOT.parent / "shared/design/ARCHITECTURE.md"]
    doc = next((p for p in candidates if p.is_file()), None)
    if doc is None:
        pytest.skip("ARCHITECTURE.md not found beside the repo")
    table: dict[str, str] = {}
    for line in doc.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("lightvlm_"):
            continue
        kind = cells[1].split(",")[0].split()[0]
        for name in (n.strip() for n in cells[0].split("/")):
            if kind == "counter" and name.endswith("_total"):
                name = name[: -len("_total")]
            table[name] = kind
    assert table == CONTRACT_METRICS


def test_compose_gives_the_service_time_to_drain_on_stop():
    """Docker's stop timeout must outlast the service's own shutdown grace period."""
    from app.settings import Settings

    grace = Settings().shutdown_grace_s
    for path, name in ((COMPOSE, "lightvlm"), (COMPOSE_CPU, "lightvlm-cpu")):
        service = load_yaml(path)["services"][name]
        assert service["stop_grace_period"].endswith("s")
        assert float(service["stop_grace_period"][:-1]) > grace
        assert any(str(e).startswith("LIGHTVLM_SHUTDOWN_GRACE_S") for e in service["environment"])


def test_every_kernel_source_is_package_data():
    """The C++ kernels are built from the installed package on first use: every file of
    lightvlm_core/kernels (sources and the headers they include) must ship in the wheel."""
    from fnmatch import fnmatch

    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["lightvlm_core"]
    kernels = REPO_ROOT / "lightvlm_core" / "kernels"
    files = [p.relative_to(kernels.parent).as_posix() for p in kernels.iterdir() if p.is_file()]
    assert any(f.endswith(".h") for f in files)
    assert [f for f in files if not any(fnmatch(f, pattern) for pattern in patterns)] == []
