"""Generate docker/grafana/dashboards/lightvlm.json, the provisioned LightVLM Serve dashboard.

The JSON is generated so that every latency panel asks the same quantiles the same way and every
query filters on the `model` template variable. Edit this file, then run

    python docker/grafana/build_dashboard.py

tests/deploy/test_dashboard.py fails when the committed JSON and this script's output differ.
Metric names are the contract in the design doc ARCHITECTURE.md ("Metrics"); the tests check that too.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "lightvlm.json"

DATASOURCE_UID = "lightvlm-prometheus"  # provisioning/datasources/prometheus.yml
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'model=~"$model"'
RATE = "$__rate_interval"
QUANTILES = (0.5, 0.95, 0.99)


# ---- PromQL builders ----------------------------------------------------------------------------


def quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket{{{SEL}}}[{RATE}])))"


def mean(histogram: str) -> str:
    return (
        f"sum(rate({histogram}_sum{{{SEL}}}[{RATE}]))"
        f" / sum(rate({histogram}_count{{{SEL}}}[{RATE}]))"
    )


def rate(counter: str, extra: str = "", by: str = "") -> str:
    matchers = SEL + (f",{extra}" if extra else "")
    aggregation = f"sum by ({by}) " if by else "sum"
    return f"{aggregation}(rate({counter}{{{matchers}}}[{RATE}]))"


def gauge(name: str) -> str:
    return f"sum({name}{{{SEL}}})"


# Per-replica view (Ray Serve replicas or Kubernetes pods; the `replica` label comes from the
# scrape config: deploy/ray/prometheus.yml, deploy/k8s/podmonitor.yaml).
REPLICA_SEL = SEL + ',replica=~"$replica"'


def per_replica_rate(counter: str) -> str:
    return f"sum by (replica) (rate({counter}{{{REPLICA_SEL}}}[{RATE}]))"


def per_replica_gauge(name: str) -> str:
    return f"sum by (replica) ({name}{{{REPLICA_SEL}}})"


def per_replica_quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, sum by (le, replica) (rate({histogram}_bucket{{{REPLICA_SEL}}}[{RATE}])))"


KEPT_RATIO = (
    rate("lightvlm_image_tokens_total", extra='stage="kept"')
    + " / "
    + rate("lightvlm_image_tokens_total", extra='stage="input"')
)


def target(expr: str, legend: str, ref: str, *, instant: bool = False, table: bool = False) -> dict:
    t = {"datasource": DS, "refId": ref, "expr": expr, "legendFormat": legend}
    if instant:
        t.update(instant=True, range=False)
    else:
        t.update(range=True)
    if table:
        t["format"] = "table"
    return t


def latency_targets(histogram: str) -> list[dict]:
    refs = iter("ABCDEFG")
    out = [target(quantile(q, histogram), f"p{round(q * 100)}", next(refs)) for q in QUANTILES]
    out.append(target(mean(histogram), "mean", next(refs)))
    return out


# ---- panel builders -----------------------------------------------------------------------------


class Layout:
    """Hands out ids and grid positions, row by row, on Grafana's 24-column grid."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.y = 0
        self.x = 0
        self.row_h = 0
        self.next_id = 1

    def _place(self, panel: dict, w: int, h: int) -> None:
        if self.x + w > 24:
            self.y += self.row_h
            self.x, self.row_h = 0, 0
        panel["id"] = self.next_id
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.next_id += 1
        self.x += w
        self.row_h = max(self.row_h, h)
        self.panels.append(panel)

    def row(self, title: str) -> None:
        self.y += self.row_h
        self.x, self.row_h = 0, 0
        self._place({"type": "row", "title": title, "collapsed": False, "panels": []}, 24, 1)
        self.y += 1
        self.x, self.row_h = 0, 0

    def timeseries(
        self, title: str, description: str, targets: list[dict], unit: str, *, w: int = 12, h: int = 8,
        stack: bool = False, min_value: float | None = 0, max_value: float | None = None,
    ) -> None:
        defaults: dict = {
            "unit": unit,
            "custom": {
                "drawStyle": "line",
                "lineWidth": 1,
                "fillOpacity": 15 if stack else 5,
                "showPoints": "never",
                "spanNulls": False,
                "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            },
        }
        if min_value is not None:
            defaults["min"] = min_value
        if max_value is not None:
            defaults["max"] = max_value
        self._place(
            {
                "type": "timeseries",
                "title": title,
                "description": description,
                "datasource": DS,
                "fieldConfig": {"defaults": defaults, "overrides": []},
                "options": {
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "none"},
                },
                "targets": targets,
            },
            w,
            h,
        )

    def stat(self, title: str, description: str, expr: str, unit: str, *, w: int = 4, h: int = 4,
             decimals: int | None = None) -> None:
        defaults: dict = {
            "unit": unit,
            "color": {"mode": "thresholds"},
            "thresholds": {"mode": "absolute", "steps": [{"color": "blue", "value": None}]},
        }
        if decimals is not None:
            defaults["decimals"] = decimals
        self._place(
            {
                "type": "stat",
                "title": title,
                "description": description,
                "datasource": DS,
                "fieldConfig": {"defaults": defaults, "overrides": []},
                "options": {
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value",
                    "graphMode": "area",
                    "justifyMode": "auto",
                    "textMode": "value",
                    "orientation": "auto",
                },
                "targets": [target(expr, title, "A")],
            },
            w,
            h,
        )

    def info_table(self, title: str, description: str, expr: str, *, w: int = 24, h: int = 4) -> None:
        self._place(
            {
                "type": "table",
                "title": title,
                "description": description,
                "datasource": DS,
                "fieldConfig": {"defaults": {}, "overrides": []},
                "options": {"showHeader": True, "cellHeight": "sm"},
                "transformations": [
                    {"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}
                ],
                "targets": [target(expr, "", "A", instant=True, table=True)],
            },
            w,
            h,
        )


# ---- the dashboard ------------------------------------------------------------------------------


def build() -> dict:
    L = Layout()

    L.row("Overview")
    L.stat("Requests / s", "Finished requests per second (all finish reasons).",
           rate("lightvlm_requests_total"), "reqps", decimals=2)
    L.stat("TTFT p95", "95th percentile of arrival to first streamed token.",
           quantile(0.95, "lightvlm_time_to_first_token_seconds"), "s")
    L.stat("Generated tokens / s", "Completion tokens produced per second, all requests.",
           rate("lightvlm_generation_tokens_total"), "none", decimals=1)
    L.stat("Image tokens kept", "Share of visual tokens kept after LightVLM pyramid merging.",
           KEPT_RATIO, "percentunit")
    L.stat("KV cache in use", "KV-cache bytes held by running requests now.",
           gauge("lightvlm_kv_cache_bytes"), "bytes")
    L.stat("Requests waiting", "Requests queued for admission to a batch now.",
           gauge("lightvlm_requests_waiting"), "none", decimals=0)
    L.info_table("Model", "Loaded model and serving configuration (lightvlm_model_info).",
                 f"max by (model, family, preset, device, dtype) (lightvlm_model_info{{{SEL}}})")

    L.row("Latency")
    L.timeseries("Prefill latency", "Prefill wall time per request (vision encoder + merging + LLM "
                 "prefill): p50 / p95 / p99 and mean.",
                 latency_targets("lightvlm_prefill_seconds"), "s")
    L.timeseries("Time to first token", "Arrival to first streamed token (queue + prefill): "
                 "p50 / p95 / p99 and mean.",
                 latency_targets("lightvlm_time_to_first_token_seconds"), "s")
    L.timeseries("Inter-token latency", "Gap between consecutive streamed tokens (decode step "
                 "time as a client sees it): p50 / p95 / p99 and mean.",
                 latency_targets("lightvlm_inter_token_latency_seconds"), "s")
    L.timeseries("End-to-end request latency", "Arrival to done: p50 / p95 / p99 and mean.",
                 latency_targets("lightvlm_e2e_request_latency_seconds"), "s")
    L.timeseries("Queue time", "Arrival to admission into a batch: p50 / p95 / p99 and mean. "
                 "Grows when the service is saturated.",
                 latency_targets("lightvlm_queue_time_seconds"), "s", w=24)

    L.row("Throughput and scheduler")
    L.timeseries("Token throughput", "Generated (completion) and prompt tokens per second.",
                 [target(rate("lightvlm_generation_tokens_total"), "generated tokens/s", "A"),
                  target(rate("lightvlm_prompt_tokens_total"), "prompt tokens/s", "B")], "none")
    L.timeseries("Requests running / waiting", "Scheduler state: requests in the running batch "
                 "and requests queued for admission.",
                 [target(gauge("lightvlm_requests_running"), "running", "A"),
                  target(gauge("lightvlm_requests_waiting"), "waiting", "B")], "none")
    L.timeseries("Batch size", "Requests per decode step: p50 / p95 / p99 and mean.",
                 latency_targets("lightvlm_batch_size"), "none")
    L.timeseries("Finish reasons", "Finished requests per second by finish_reason "
                 "(stop, length, cancelled, error).",
                 [target(rate("lightvlm_requests_total", by="finish_reason"), "{{finish_reason}}", "A")],
                 "reqps", stack=True)
    L.timeseries("Rejections by reason", "Requests rejected per second by reason (4xx, 429 queue "
                 "full, 503 not ready).",
                 [target(rate("lightvlm_requests_rejected_total", by="reason"), "{{reason}}", "A")],
                 "reqps", stack=True, w=24)

    L.row("LightVLM acceleration and KV cache")
    L.timeseries("KV-cache bytes", "Bytes of KV cache held by running requests now (after "
                 "decode-time compression).",
                 [target(gauge("lightvlm_kv_cache_bytes"), "KV-cache bytes", "A")], "bytes")
    L.timeseries("KV-cache tokens", "KV entries held now, summed over layers.",
                 [target(gauge("lightvlm_kv_cache_tokens"), "KV entries", "A")], "none")
    L.timeseries("KV entries evicted / s", "Entries removed per second by KV-cache compression.",
                 [target(rate("lightvlm_kv_cache_evicted_tokens_total"), "evicted/s", "A")], "none")
    L.timeseries("Image tokens kept ratio", "Visual tokens kept after pyramid merging divided by "
                 "visual tokens in (1 = no reduction).",
                 [target(KEPT_RATIO, "kept / input", "A")], "percentunit", max_value=1)
    L.timeseries("Image tokens kept per request", "Distribution over requests of the fraction of "
                 "their image tokens kept after reduction (lightvlm_image_tokens_kept_ratio).",
                 latency_targets("lightvlm_image_tokens_kept_ratio"), "percentunit", max_value=1)
    L.timeseries("Image preprocessing time", "Decoding and checking one request image in the API "
                 "process (lightvlm_image_preprocess_seconds).",
                 latency_targets("lightvlm_image_preprocess_seconds"), "s")

    L.row("Replicas (scale-out)")
    L.timeseries("Requests / s per replica", "Finished requests per second by replica: is the load "
                 "balanced?",
                 [target(per_replica_rate("lightvlm_requests_total"), "{{replica}}", "A")], "reqps")
    L.timeseries("Generated tokens / s per replica", "Completion tokens per second by replica.",
                 [target(per_replica_rate("lightvlm_generation_tokens_total"), "{{replica}}", "A")], "none")
    L.timeseries("Running / waiting per replica", "Requests in each replica's batch and in its "
                 "queue (the autoscaling signal on Kubernetes).",
                 [target(per_replica_gauge("lightvlm_requests_running"), "{{replica}} running", "A"),
                  target(per_replica_gauge("lightvlm_requests_waiting"), "{{replica}} waiting", "B")], "none")
    L.timeseries("TTFT p95 per replica", "95th percentile time to first token by replica.",
                 [target(per_replica_quantile(0.95, "lightvlm_time_to_first_token_seconds"), "{{replica}}",
                         "A")], "s")

    return {
        "title": "LightVLM Serve",
        "uid": "lightvlm-serve",
        "description": "LightVLM Serve: latency, throughput, scheduler, KV cache and visual-token "
                       "reduction. Metrics: lightvlm_* (see README).",
        "tags": ["lightvlm", "vlm", "inference"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"selected": False, "text": "Prometheus", "value": DATASOURCE_UID},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                    "options": [],
                },
                {
                    "name": "model",
                    "label": "Model",
                    "type": "query",
                    "datasource": DS,
                    "definition": "label_values(lightvlm_model_info, model)",
                    "query": {
                        "qryType": 1,
                        "query": "label_values(lightvlm_model_info, model)",
                        "refId": "PrometheusVariableQueryEditor-VariableQuery",
                    },
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "hide": 0,
                    "regex": "",
                    "sort": 1,
                    "options": [],
                },
                {
                    "name": "replica",
                    "label": "Replica",
                    "type": "query",
                    "datasource": DS,
                    "definition": "label_values(lightvlm_model_info, replica)",
                    "query": {
                        "qryType": 1,
                        "query": "label_values(lightvlm_model_info, replica)",
                        "refId": "PrometheusVariableQueryEditor-VariableQuery",
                    },
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",  # also matches series without the label (a single server)
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "hide": 0,
                    "regex": "",
                    "sort": 1,
                    "options": [],
                },
            ]
        },
        "panels": L.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
