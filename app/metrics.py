"""Prometheus metrics of one app instance (own registry, so tests can build several apps).

Names and meanings are the contract in ARCHITECTURE.md; buckets follow vLLM for the same
quantities. Scheduler-side metrics arrive through `SchedulerObserver` callbacks on the engine
thread (prometheus_client is thread-safe); gauges read the scheduler's stats at scrape time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from lightvlm_core.client import SchedulerObserver, SchedulerStats
from lightvlm_core.types import DoneEvent, Event, GenerationResult, Usage

# No `*_created` series (process-wide switch; vLLM does the same): they only double the output.
disable_created_metrics()

# vLLM's vllm:time_to_first_token_seconds buckets.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
# vLLM's vllm:inter_token_latency_seconds buckets.
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
# vLLM's request-latency buckets (e2e_request_latency_seconds, request_queue_time_seconds, ...).
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# Prefill gets the TTFT buckets, not vLLM's request_prefill_time_seconds ones (which start at
# 0.3 s): prefill is what LightVLM speeds up, and on a GPU it is mostly well under 0.3 s.
PREFILL_BUCKETS = TTFT_BUCKETS
# Requests per decode step: powers of two, like vLLM's iteration_tokens_total.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Decoding, checking and converting an upload: milliseconds for a small PNG, ~1 s for a huge one.
IMAGE_PREPROCESS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Fraction of a request's image tokens kept after reduction (1.0: preset none).
KEPT_RATIO_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

# Label values known in advance, exported at 0 from the start so that every dashboard series
# exists before the first event (a panel on a counter that does not exist yet shows "No data").
FINISH_REASONS = ("stop", "length", "cancelled", "error")
IMAGE_TOKEN_STAGES = ("input", "kept")
REJECT_REASONS = (
    "invalid_request", "invalid_image", "context_length_exceeded", "unauthorized", "not_found",
    "model_not_found", "method_not_allowed", "body_too_large", "unsupported_media_type", "queue_full",
    "not_ready", "out_of_memory",
    "timeout", "too_many_uploads", "client_aborted",  # body intake (app.middleware, app.errors)
    "header_timeout", "header_too_large", "invalid_http",  # request heads (app.connections)
)  # fmt: skip


class ServiceMetrics(SchedulerObserver):
    """Every lightvlm_* metric, labelled with `model`; also the scheduler's observer."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._rejected_reasons: set[str] = set()
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r, m = self.registry, ["model"]

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, m, buckets=buckets, registry=r)

        self.prefill = hist(
            "lightvlm_prefill_seconds",
            "Prefill wall time per request (vision encoder + LLM prefill)",
            PREFILL_BUCKETS,
        )
        self.ttft = hist("lightvlm_time_to_first_token_seconds", "Arrival to first token", TTFT_BUCKETS)
        self.itl = hist("lightvlm_inter_token_latency_seconds", "Gap between streamed tokens", ITL_BUCKETS)
        self.e2e = hist("lightvlm_e2e_request_latency_seconds", "Arrival to done", REQUEST_LATENCY_BUCKETS)
        self.queue = hist(
            "lightvlm_queue_time_seconds", "Arrival to admitted to a batch", REQUEST_LATENCY_BUCKETS
        )
        self.batch_size = hist("lightvlm_batch_size", "Requests per decode step", BATCH_SIZE_BUCKETS)
        self.kv_bytes = Gauge(
            "lightvlm_kv_cache_bytes", "KV-cache bytes held by running requests now", m, registry=r
        )
        self.kv_tokens = Gauge(
            "lightvlm_kv_cache_tokens", "KV entries held now (summed over layers)", m, registry=r
        )
        self.running = Gauge("lightvlm_requests_running", "Requests in the running batch", m, registry=r)
        self.waiting = Gauge("lightvlm_requests_waiting", "Requests waiting for admission", m, registry=r)
        self.evicted = Counter(
            "lightvlm_kv_cache_evicted_tokens", "KV entries removed by KV compression", m, registry=r
        )
        self.image_tokens = Counter(
            "lightvlm_image_tokens",
            "Image tokens in (stage=input) and kept after merging (stage=kept)",
            ["model", "stage"],
            registry=r,
        )
        self.prompt_tokens = Counter("lightvlm_prompt_tokens", "Prompt tokens prefilled", m, registry=r)
        self.generation_tokens = Counter("lightvlm_generation_tokens", "Tokens generated", m, registry=r)
        self.requests = Counter(
            "lightvlm_requests", "Finished requests", ["model", "finish_reason"], registry=r
        )
        self.rejected = Counter(
            "lightvlm_requests_rejected", "Requests rejected (4xx/429/503)", ["model", "reason"], registry=r
        )
        self.engine_restarts = Counter(
            "lightvlm_engine_restarts", "Engine processes started again after one died", m, registry=r
        )
        self.image_preprocess = hist(
            "lightvlm_image_preprocess_seconds",
            "Decoding and checking one request image in the API process",
            IMAGE_PREPROCESS_BUCKETS,
        )
        self.kept_ratio = hist(
            "lightvlm_image_tokens_kept_ratio",
            "Fraction of a request's image tokens kept after reduction",
            KEPT_RATIO_BUCKETS,
        )
        self.model_info = Gauge(
            "lightvlm_model_info",
            "Loaded model (always 1)",
            ["model", "family", "preset", "device", "dtype"],
            registry=r,
        )
        self._export_known_series()

    def _export_known_series(self) -> None:
        """Create every series whose labels are known (value 0) under the current model name."""
        model = self.model
        for metric in self._single_label_metrics():
            metric.labels(model)
        for stage in IMAGE_TOKEN_STAGES:
            self.image_tokens.labels(model, stage)
        for reason in FINISH_REASONS:
            self.requests.labels(model, reason)
        for reason in REJECT_REASONS:
            self.rejected.labels(model, reason)

    def _single_label_metrics(self) -> tuple[Counter | Gauge | Histogram, ...]:
        return (
            self.kv_bytes,
            self.kv_tokens,
            self.running,
            self.waiting,
            self.prompt_tokens,
            self.generation_tokens,
            self.evicted,
            self.engine_restarts,
            self.prefill,
            self.ttft,
            self.itl,
            self.e2e,
            self.queue,
            self.batch_size,
            self.image_preprocess,
            self.kept_ratio,
        )

    def _drop_unused_series(self, model: str) -> None:
        """Remove the zero series exported under a provisional name (before the engine said its
        own); rejections counted under that name stay."""
        for metric in self._single_label_metrics():
            metric.remove(model)
        for stage in IMAGE_TOKEN_STAGES:
            self.image_tokens.remove(model, stage)
        for reason in FINISH_REASONS:
            self.requests.remove(model, reason)
        for reason in REJECT_REASONS:
            if reason not in self._rejected_reasons:
                self.rejected.remove(model, reason)

    def bind(self, model: str, stats: Callable[[], SchedulerStats]) -> None:
        """Once the model is loaded: fix the label and read the gauges from the scheduler."""
        if model != self.model:
            self._drop_unused_series(self.model)
        self.model = model
        self._export_known_series()
        self.kv_bytes.labels(model).set_function(lambda: stats().kv_cache_bytes)
        self.kv_tokens.labels(model).set_function(lambda: stats().kv_cache_tokens)
        self.running.labels(model).set_function(lambda: stats().num_running)
        self.waiting.labels(model).set_function(lambda: stats().num_waiting)

    def set_model_info(self, family: str, preset: str, device: str, dtype: str) -> None:
        self.model_info.labels(self.model, family, preset, device, dtype).set(1)

    def reject(self, reason: str) -> None:
        self._rejected_reasons.add(reason)
        self.rejected.labels(self.model, reason).inc()

    def observe_image_preprocess(self, seconds: float) -> None:
        self.image_preprocess.labels(self.model).observe(seconds)

    def observe_kept_ratio(self, image_tokens: int, image_tokens_kept: int) -> None:
        """One finished request's share of image tokens kept; text-only requests are skipped."""
        if image_tokens > 0:
            self.kept_ratio.labels(self.model).observe(image_tokens_kept / image_tokens)

    def observe_usage(self, usage: Usage) -> None:
        self.observe_kept_ratio(usage.image_tokens, usage.image_tokens_kept)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # ---- SchedulerObserver (engine thread) ---------------------------------------------------

    def on_admitted(self, queue_s: float, prefill_s: float, num_prompt_tokens: int) -> None:
        self.queue.labels(self.model).observe(queue_s)
        self.prefill.labels(self.model).observe(prefill_s)
        self.prompt_tokens.labels(self.model).inc(num_prompt_tokens)

    def on_token(self, ttft_s: float | None, itl_s: float | None) -> None:
        self.generation_tokens.labels(self.model).inc()
        if ttft_s is not None:
            self.ttft.labels(self.model).observe(ttft_s)
        if itl_s is not None:
            self.itl.labels(self.model).observe(itl_s)

    def on_finished(self, finish_reason: str, e2e_s: float) -> None:
        self.requests.labels(self.model, finish_reason).inc()
        self.e2e.labels(self.model).observe(e2e_s)

    def on_step(self, batch_size: int) -> None:
        self.batch_size.labels(self.model).observe(batch_size)

    def on_engine_counters(self, evicted_tokens: int, image_tokens_in: int, image_tokens_kept: int) -> None:
        self.evicted.labels(self.model).inc(evicted_tokens)
        self.image_tokens.labels(self.model, "input").inc(image_tokens_in)
        self.image_tokens.labels(self.model, "kept").inc(image_tokens_kept)


class UsageReportingStream:
    """A request's stream that hands its final usage to `on_usage` (for the per-request
    histograms) as the done event passes, however the route consumes it."""

    def __init__(self, stream: Any, on_usage: Callable[[Usage], None]) -> None:
        self._stream, self._on_usage = stream, on_usage

    def __getattr__(self, name: str) -> Any:  # request_id, cancel, ...
        return getattr(self._stream, name)

    async def __aiter__(self) -> AsyncIterator[Event]:
        async for event in self._stream:
            if isinstance(event, DoneEvent):
                self._on_usage(event.usage)
            yield event

    async def collect(self) -> GenerationResult:
        result = await self._stream.collect()
        self._on_usage(result.usage)
        return result
