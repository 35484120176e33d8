"""`lightvlm serve --ray`: connect to the Ray cluster in $RAY_ADDRESS (else start a local one),
deploy the app behind Ray's HTTP proxy on the configured host:port, and serve until interrupted."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

logger = logging.getLogger("lightvlm.ray")


def run_ray_serve(overrides: dict[str, Any], replicas: int | None = None, max_replicas: int | None = None,
                  cpus_per_replica: int = 1) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        print("error: --ray needs Ray Serve: pip install 'lightvlm-serve[ray]'", file=sys.stderr)
        return 2
    from app.scaleout.deployment import build_app
    from app.settings import Settings

    settings = Settings(**overrides)
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # Our own cluster has one proxy, on this node: let it balance over every replica rather
        # than prefer the ones beside it (Ray's default; set the same on `ray start` elsewhere).
        os.environ.setdefault("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "0")
    ray.init(address=address, namespace="serve", logging_level=logging.WARNING)
    # One proxy on the head node at host:port, the address this command prints (a multi-machine
    # cluster behind a load balancer would rather use deploy/ray/serve.yaml with EveryNode).
    serve.start(proxy_location="HeadOnly", http_options={"host": settings.host, "port": settings.port})
    application = build_app({"settings": overrides, "replicas": replicas or 1, "max_replicas": max_replicas,
                             "cpus_per_replica": cpus_per_replica})
    serve.run(application, name="lightvlm", route_prefix="/", blocking=False)
    print(f"lightvlm: serving on http://{settings.host}:{settings.port} through Ray Serve "
          f"({'cluster ' + address if address else 'local Ray cluster'})", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.delete("lightvlm")
    if address is None:  # our own local cluster: take it down with us
        serve.shutdown()
        ray.shutdown()
    return 0
