"""Static checks of the compose stack and its Prometheus configuration.

Nothing here needs a Docker engine. The external validators (Debian's `docker-compose` and
`promtool` from the `prometheus` package) are skipped only on a developer machine without them;
under CI (CI=true) .ci/run installs them and a missing one is a failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_files import (  # noqa: E402
    COMPOSE,
    COMPOSE_CPU,
    PROMETHEUS_YML,
    SERVICE_PORT,
    compose_env,
    container_ports,
    env_of,
    load_yaml,
    mounts,
    stage,
)
from promql import REPO_ROOT, dashboard_queries  # noqa: E402
from tools import require_tool  # noqa: E402


# ---- docker-compose -------------------------------------------------------------------------------


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


def test_compose_gives_the_service_time_to_drain_on_stop():
    """Docker's stop timeout must outlast the service's own shutdown grace period."""
    from app.settings import Settings

    grace = Settings().shutdown_grace_s
    for path, name in ((COMPOSE, "lightvlm"), (COMPOSE_CPU, "lightvlm-cpu")):
        service = load_yaml(path)["services"][name]
        assert service["stop_grace_period"].endswith("s")
        assert float(service["stop_grace_period"][:-1]) > grace
        assert any(str(e).startswith("LIGHTVLM_SHUTDOWN_GRACE_S") for e in service["environment"])
