"""X-LightVLM-Replica middleware and the Ray replica's ready gate, without Ray."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from app.replica import REPLICA_NAME_ENV, ReplicaHeaderMiddleware, replica_name
from app.scaleout.ready_gate import ReadyGate


def small_app() -> Starlette:
    async def ok(request):
        return JSONResponse({"ok": True})

    async def stream(request):
        async def chunks():
            for i in range(3):
                yield f"data: {i}\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    async def boom(request):
        raise RuntimeError("boom")

    app = Starlette(routes=[Route("/ok", ok), Route("/stream", stream), Route("/boom", boom)])
    app.add_middleware(ReplicaHeaderMiddleware)
    return app


def test_every_response_names_the_replica(monkeypatch):
    monkeypatch.setenv(REPLICA_NAME_ENV, "replica-7")
    with TestClient(small_app(), raise_server_exceptions=False) as client:
        for path, status in (("/ok", 200), ("/stream", 200), ("/missing", 404)):
            resp = client.get(path)
            assert resp.status_code == status and resp.headers["x-lightvlm-replica"] == "replica-7", path
        assert client.get("/stream").text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    # Wrapped once more outside (as the Ray deployment does): unhandled 500s too, and no duplicate.
    with TestClient(ReplicaHeaderMiddleware(small_app()), raise_server_exceptions=False) as client:
        for path, status in (("/ok", 200), ("/boom", 500)):
            resp = client.get(path)
            assert resp.status_code == status and resp.headers.get_list("x-lightvlm-replica") == ["replica-7"]


def test_replica_name_defaults_to_the_host_name(monkeypatch):
    import socket

    monkeypatch.delenv(REPLICA_NAME_ENV, raising=False)
    assert replica_name() == socket.gethostname()


async def run_lifespan(service) -> list[str]:
    """Drive the gate's lifespan startup like an ASGI server; returns what the server saw."""
    async def inner(scope, receive, send):
        await receive()
        await send({"type": "lifespan.startup.complete"})

    sent: list[str] = []

    async def receive():
        return {"type": "lifespan.startup"}

    async def send(message):
        sent.append(message["type"])

    await ReadyGate(inner, service, poll_s=0.01)({"type": "lifespan"}, receive, send)
    return sent


def test_ready_gate_holds_startup_until_the_model_is_ready():
    service = SimpleNamespace(ready=False, state="loading")

    async def scenario():
        task = asyncio.create_task(run_lifespan(service))
        await asyncio.sleep(0.1)
        assert not task.done()  # still loading: Ray must not route here yet
        service.ready, service.state = True, "ready"
        return await asyncio.wait_for(task, 5)

    assert asyncio.run(scenario()) == ["lifespan.startup.complete"]


def test_ready_gate_fails_startup_when_the_model_fails():
    service = SimpleNamespace(ready=False, state="failed")
    assert asyncio.run(run_lifespan(service)) == ["lifespan.startup.failed"]
