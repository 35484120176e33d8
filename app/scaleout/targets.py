"""Per-replica Prometheus scrape targets for the Ray deployment.

Through Ray's proxy, `/metrics` reaches whichever replica the router picks, so each replica also
serves its own registry on an ephemeral port of its node, and announces `ip:port` to a small
detached registry actor every few seconds. `GET /-/replicas` (any replica, through the proxy)
answers the live list in Prometheus' HTTP service-discovery format, with a `replica` label; see
deploy/ray/prometheus.yml.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import ray
from prometheus_client import CollectorRegistry, start_http_server

REGISTRY_ACTOR = "lightvlm-metrics-targets"
REGISTRY_NAMESPACE = "lightvlm"
HEARTBEAT_S = 2.0
STALE_AFTER_S = 3 * HEARTBEAT_S


@ray.remote(num_cpus=0)
class TargetRegistry:
    """replica id -> (ip:port, last heartbeat); entries not renewed are dropped (dead replicas)."""

    def __init__(self) -> None:
        self._targets: dict[str, tuple[str, float]] = {}

    def heartbeat(self, replica: str, address: str) -> None:
        self._targets[replica] = (address, time.monotonic())

    def remove(self, replica: str) -> None:
        self._targets.pop(replica, None)

    def live(self) -> dict[str, str]:
        now = time.monotonic()
        self._targets = {r: t for r, t in self._targets.items() if now - t[1] < STALE_AFTER_S}
        return {r: address for r, (address, _) in self._targets.items()}


def registry_actor() -> Any:
    return TargetRegistry.options(
        name=REGISTRY_ACTOR, namespace=REGISTRY_NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


class MetricsTargets:
    """One replica's metrics endpoint and its announcement."""

    def __init__(self, replica: str, registry: CollectorRegistry) -> None:
        self.replica = replica
        self.registry = registry
        self.address: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._actor: Any = None

    def start(self) -> None:
        ip = ray.util.get_node_ip_address()
        server, _thread = start_http_server(0, addr=ip, registry=self.registry)
        self.address = f"{ip}:{server.server_port}"
        self._actor = registry_actor()
        self._task = asyncio.get_running_loop().create_task(self._announce())

    async def _announce(self) -> None:
        while True:
            try:
                await self._actor.heartbeat.remote(self.replica, self.address)
            except Exception:  # the registry actor died (its node went away): create it again
                with contextlib.suppress(Exception):
                    self._actor = registry_actor()
            await asyncio.sleep(HEARTBEAT_S)

    async def http_sd(self) -> list[dict[str, Any]]:
        """Prometheus http_sd_configs format: one target group per live replica."""
        live = await registry_actor().live.remote()
        return [{"targets": [address], "labels": {"replica": replica}} for replica, address in sorted(live.items())]
