"""The Ray Serve deployment of the service: one replica = one `create_app(settings)` (model,
scheduler, routes, metrics), wrapped unchanged with `@serve.ingress`.

Sizing: one GPU per replica when the cluster has GPUs and the device is not forced to CPU, else
`cpus_per_replica` CPUs with the same number of torch/OpenMP threads. Admission: Ray sends a
replica at most `max_batch_size` requests at once (one full batch); the rest wait in the proxy's
bounded queue (`max_queued_requests`, default `max_queue` per replica at the most replicas) for
whichever replica frees a row first, and past it get 429 with Retry-After, as a single server's
full queue does. (A deeper per-replica queue would also defeat balancing: Ray's proxy prefers
replicas on its own node while they have room.) Autoscaling follows ongoing requests per replica
(`target_ongoing_requests`, default one full batch).
"""

from __future__ import annotations

import os
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve.config import BackpressureConfig

from app.main import create_app
from app.replica import REPLICA_NAME_ENV, ReplicaHeaderMiddleware
from app.scaleout.ready_gate import ReadyGate
from app.scaleout.targets import MetricsTargets
from app.settings import Settings

DEPLOYMENT_NAME = "LightVLM"
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@serve.ingress()
class LightVLMReplica:
    """One replica: builds the app at replica start; Ray runs its lifespan (the model load)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = Settings(**settings)
        self._app: FastAPI | None = None
        self._targets: MetricsTargets | None = None

    async def __serve_build_asgi_app__(self) -> Any:
        context = serve.get_replica_context()
        os.environ[REPLICA_NAME_ENV] = context.replica_id.unique_id  # the X-LightVLM-Replica value
        self._app = create_app(self._settings)
        service = self._app.state.service
        self._targets = MetricsTargets(context.replica_id.unique_id, service.metrics.registry)
        self._targets.start()
        self._app.add_api_route("/-/replicas", self._targets.http_sd, methods=["GET"], include_in_schema=False)
        return ReplicaHeaderMiddleware(ReadyGate(self._app, service))  # outside everything: 500s too

    def check_health(self) -> None:
        """Ray restarts a replica whose model failed or whose engine stopped for good."""
        service = self._app.state.service if self._app is not None else None
        if service is not None and service.state in ("failed", "stopped"):
            raise RuntimeError(f"service {service.state}: {service.error}")


def deployment_options(
    settings: Settings,
    replicas: int = 1,
    max_replicas: int | None = None,
    cpus_per_replica: int = 1,
    use_gpu: bool | None = None,
    max_queued_requests: int | None = None,
    autoscaling: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Options for `serve.deployment(...)`: resources, admission bounds and autoscaling."""
    max_replicas = max(replicas, max_replicas or replicas)
    queue_bound = settings.max_queue * max_replicas
    if use_gpu is None:
        use_gpu = settings.device != "cpu" and ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    threads = str(cpus_per_replica)
    actor: dict[str, Any] = {"num_cpus": 1 if use_gpu else cpus_per_replica,
                             "runtime_env": {"env_vars": dict.fromkeys(THREAD_ENV_VARS, threads)}}
    if use_gpu:
        actor["num_gpus"] = 1
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": actor,
        "max_ongoing_requests": settings.max_batch_size,
        "max_queued_requests": max_queued_requests if max_queued_requests is not None else queue_bound,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=1),
        "graceful_shutdown_timeout_s": settings.shutdown_grace_s,
        "health_check_period_s": 5,
    }
    if max_replicas > replicas or autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": replicas,
            "initial_replicas": replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": settings.max_batch_size,
            **(autoscaling or {}),
        }
    else:
        options["num_replicas"] = replicas
    return options


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Ray Serve application builder (`import_path: app.scaleout.deployment:build_app`).

    args: `settings` (Settings fields, e.g. {"model": "models/shapes-demo", "device": "cpu"}; unset
    ones come from LIGHTVLM_* in the replica's environment), `replicas`, `max_replicas`,
    `cpus_per_replica`, `use_gpu`, `max_queued_requests`, `autoscaling` (extra autoscaling_config)."""
    args = dict(args or {})
    overrides = args.pop("settings", {}) or {}
    settings = Settings(**overrides)
    options = deployment_options(settings, **args)
    return serve.deployment(LightVLMReplica).options(**options).bind(overrides)
