"""deploy/ray: the Serve config parses with Ray's own schema and builds the application; the
deployment options follow the settings (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[dev]' installs it)")

from ray.serve.schema import ServeDeploySchema  # noqa: E402

from app.scaleout.deployment import build_app, deployment_options  # noqa: E402
from app.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_is_valid_for_ray_and_builds_the_app() -> None:
    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy" / "ray" / "serve.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "app.scaleout.deployment:build_app"
    built = build_app(application.args)
    assert type(built).__name__ == "Application"


def test_cpu_replicas_get_their_threads_and_a_fixed_count() -> None:
    options = deployment_options(Settings(device="cpu", max_batch_size=4, max_queue=10), replicas=2,
                                 cpus_per_replica=3)
    assert options["num_replicas"] == 2 and "autoscaling_config" not in options
    actor = options["ray_actor_options"]
    assert actor["num_cpus"] == 3 and "num_gpus" not in actor
    assert actor["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "3"
    assert options["max_ongoing_requests"] == 4  # one batch per replica; the rest waits in the proxy
    assert options["max_queued_requests"] == 20
    assert options["backpressure_config"].status_code == 429


def test_gpu_replicas_autoscale_on_ongoing_requests() -> None:
    options = deployment_options(Settings(max_batch_size=8), replicas=1, max_replicas=4, use_gpu=True)
    assert options["ray_actor_options"]["num_gpus"] == 1
    assert options["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 4,
                                             "target_ongoing_requests": 8}
