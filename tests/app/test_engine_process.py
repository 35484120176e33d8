"""The engine in its own process, behind real HTTP: greedy answers equal the in-process engine's,
and when the engine process is killed (kill -9) every stream in flight ends with an error event
within seconds, /ready turns 503, the service starts a new engine process and /ready is 200 again,
without restarting the API process; the restart is counted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import live_server, make_settings, wait_for

from app.main import create_app
from lightvlm_core.engine import load_engine
from lightvlm_core.types import GenerationRequest, SamplingParams

PROMPT = "Describe the image."


async def stream(http: httpx.AsyncClient, max_new_tokens: int) -> list[Any]:
    events: list[Any] = []
    body = {"prompt": PROMPT, "max_new_tokens": max_new_tokens, "ignore_eos": True}
    async with http.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def restarts(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "lightvlm_engine_restarts_total")


def test_engine_process_parity_and_restart_after_kill() -> None:
    app = create_app(make_settings(device="cpu", warmup=False, max_new_tokens=4096, max_batch_size=8))
    service = app.state.service
    with live_server(app) as base_url:
        wait_for(lambda: httpx.get(f"{base_url}/ready").status_code == 200, timeout=180)
        pid = service.client.pid
        assert pid is not None and pid != os.getpid()

        # the engine process gives what the offline engine gives, token for token
        answer = httpx.post(f"{base_url}/generate", json={"prompt": PROMPT, "max_new_tokens": 8, "stream": False},
                            timeout=60).json()
        offline = load_engine(device="cpu").generate([GenerationRequest(PROMPT, sampling=SamplingParams(8))])[0]
        assert answer["token_ids"] == offline.token_ids and answer["text"] == offline.text

        async def main() -> tuple[list[list[Any]], float]:
            async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
                tasks = [asyncio.create_task(stream(http, 480)) for _ in range(8)]
                await asyncio.to_thread(wait_for, lambda: service.client.stats().num_running == 8, 60)
                killed = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
                return results, time.monotonic() - killed

        results, ended_after_s = asyncio.run(main())
        assert ended_after_s < 10
        assert httpx.get(f"{base_url}/ready").status_code == 503  # a new engine is starting
        for events in results:
            assert events[-1] == "[DONE]" and events[-2]["type"] == "error", events[-3:]
            assert events[-2]["error_type"] == "engine_failed" and events[0]["type"] == "token"
        assert httpx.get(f"{base_url}/health").status_code == 200  # the API process lives on
        wait_for(lambda: httpx.get(f"{base_url}/ready").status_code == 200, timeout=120)
        assert service.client.pid not in (None, pid) and restarts(base_url) == 1
        again = httpx.post(f"{base_url}/generate", json={"prompt": PROMPT, "max_new_tokens": 8, "stream": False},
                           timeout=60)
        assert again.status_code == 200 and again.json()["token_ids"] == offline.token_ids
