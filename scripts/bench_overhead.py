"""What the serving path costs around the engine: the same EngineCore, with a runner whose steps
take a fixed time (lightvlm_core.bench.sleep_runner), driven (A) in-process through EngineClient
(core in a thread, no HTTP) and (B) through the whole service: HTTP + SSE, API process + engine
process. Output tokens/s of both, per round, and the median ratio B/A.

    python scripts/bench_overhead.py [--concurrency 8] [--tokens 200] [--waves 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

BUILDER = "lightvlm_core.bench.sleep_runner:sleep_runner"
STEP_S = 0.010


def measure_in_process(concurrency: int, tokens: int, waves: int) -> float:
    from lightvlm_core.bench.sleep_runner import SleepRunner
    from lightvlm_core.client import EngineClient, load_tokenizer
    from lightvlm_core.scheduler import SchedulerConfig
    from lightvlm_core.types import GenerationRequest, SamplingParams

    client = EngineClient.start_in_thread(SleepRunner(STEP_S), SchedulerConfig(max_batch_size=concurrency),
                                          load_tokenizer(None))

    async def slot() -> int:
        n = 0
        for _ in range(waves):
            request = GenerationRequest("Describe the image.", sampling=SamplingParams(tokens, ignore_eos=True))
            n += len((await (await client.submit(request)).collect()).token_ids)
        return n

    async def main() -> float:
        start = time.monotonic()
        counts = await asyncio.gather(*(slot() for _ in range(concurrency)))
        return sum(counts) / (time.monotonic() - start)

    try:
        return asyncio.run(main())
    finally:
        client.shutdown()


def measure_http(base_url: str, concurrency: int, tokens: int, waves: int) -> float:
    body = {"prompt": "Describe the image.", "max_new_tokens": tokens, "ignore_eos": True}

    async def slot(http: httpx.AsyncClient) -> int:
        n = 0
        for _ in range(waves):
            async with http.stream("POST", "/generate", json=body) as response:
                async for line in response.aiter_lines():
                    n += line.startswith('data: {"type":"token"') or line.startswith('data: {"type": "token"')
        return n

    async def main() -> float:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
            start = time.monotonic()
            counts = await asyncio.gather(*(slot(http) for _ in range(concurrency)))
            return sum(counts) / (time.monotonic() - start)

    return asyncio.run(main())


def serve(port: int, concurrency: int) -> None:
    import uvicorn

    from app.main import create_app
    from app.settings import Settings

    settings = Settings(max_batch_size=concurrency, warmup=False, max_new_tokens=100_000, request_timeout_s=600)
    uvicorn.run(create_app(settings, engine=BUILDER), host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--waves", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.concurrency)
        return
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--concurrency", str(args.concurrency)])
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base_url}/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the service did not become ready")
            time.sleep(0.5)
        rows = []
        for r in range(args.rounds):  # interleaved: A B, A B, ...
            a = measure_in_process(args.concurrency, args.tokens, args.waves)
            b = measure_http(base_url, args.concurrency, args.tokens, args.waves)
            rows.append({"round": r, "in_process_tok_s": round(a, 1), "http_sse_tok_s": round(b, 1),
                         "ratio": round(b / a, 4)})
            print(json.dumps(rows[-1]), flush=True)
        ratio = statistics.median(row["ratio"] for row in rows)
        print(json.dumps({"median_ratio_http_over_in_process": ratio, "cost_pct": round((1 - ratio) * 100, 2),
                          "step_ms": STEP_S * 1e3, **{k: getattr(args, k) for k in ("concurrency", "tokens", "waves")},
                          "cpus": os.cpu_count()}))
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
