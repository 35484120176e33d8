"""PromQL helpers for the deployment tests: the metric contract and the dashboard's queries.

`dashboard_queries()` returns every PromQL expression of the provisioned Grafana dashboard with
the Grafana variables replaced by values a plain Prometheus understands ($model -> .*,
$__rate_interval -> 1m, ...), ready to send to Prometheus' HTTP API (/api/v1/query). The static
tests use it to check metric names and PromQL syntax; an end-to-end test can use it to check
that each expression returns data from a live service.

Traffic an end-to-end run needs before every expression has data: a few image+prompt requests
(latencies, tokens, image tokens in/kept, batch size, finish reasons), one rejected request
(e.g. a 422 or 400: rejections by reason) and a request whose KV budget forces compression
(KV entries evicted). Gauges (running/waiting, KV bytes/tokens, model info) exist from startup.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_PATH = REPO_ROOT / "docker" / "grafana" / "dashboards" / "lightvlm.json"

# The metric contract (ARCHITECTURE.md, "Metrics"): name -> Prometheus type. Counters are
# declared without `_total` and exposed with it, as prometheus-client does.
CONTRACT_METRICS: dict[str, str] = {
    "lightvlm_prefill_seconds": "histogram",
    "lightvlm_time_to_first_token_seconds": "histogram",
    "lightvlm_inter_token_latency_seconds": "histogram",
    "lightvlm_e2e_request_latency_seconds": "histogram",
    "lightvlm_queue_time_seconds": "histogram",
    "lightvlm_kv_cache_bytes": "gauge",
    "lightvlm_kv_cache_tokens": "gauge",
    "lightvlm_kv_cache_evicted_tokens": "counter",
    "lightvlm_image_tokens": "counter",
    "lightvlm_requests_running": "gauge",
    "lightvlm_requests_waiting": "gauge",
    "lightvlm_batch_size": "histogram",
    "lightvlm_prompt_tokens": "counter",
    "lightvlm_generation_tokens": "counter",
    "lightvlm_requests": "counter",
    "lightvlm_requests_rejected": "counter",
    "lightvlm_model_info": "gauge",
}

# Beyond ARCHITECTURE.md's table (issue 18): on the dashboard, exported at 0 from the start.
EXTRA_METRICS: dict[str, str] = {
    "lightvlm_image_preprocess_seconds": "histogram",
    "lightvlm_image_tokens_kept_ratio": "histogram",
}
DASHBOARD_METRICS: dict[str, str] = {**CONTRACT_METRICS, **EXTRA_METRICS}

_SERIES_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}


def exposed_series_names(contract: Mapping[str, str] = CONTRACT_METRICS) -> set[str]:
    """Series names a scrape of /metrics shows for the contract (histogram parts, `_total`)."""
    return {name + suffix for name, kind in contract.items() for suffix in _SERIES_SUFFIXES[kind]}


# Values for Grafana's variables when an expression goes to Prometheus directly.
DEFAULT_SUBSTITUTIONS: dict[str, str] = {
    "model": ".*",
    "replica": ".*",  # the per-replica row (scale-out)
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1m",
}

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)(?::\w+)?\]\]|\$(\w+)")


def substitute(expr: str, values: Mapping[str, str] = DEFAULT_SUBSTITUTIONS) -> str:
    """Replace Grafana variables ($x, ${x}, ${x:fmt}, [[x]]); an unknown variable is an error."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(repl, expr)


@dataclass(frozen=True)
class PanelQuery:
    panel: str  # panel title
    ref_id: str  # target refId within the panel
    legend: str  # legendFormat
    raw: str  # expression as stored in the dashboard
    expr: str  # expression with the variables substituted


def load_dashboard(path: Path = DASHBOARD_PATH) -> dict:
    return json.loads(Path(path).read_text())


def iter_panels(dashboard: Mapping) -> Iterator[dict]:
    """Every panel, rows included, and the panels nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from iter_panels(panel)


def dashboard_queries(
    dashboard: Mapping | None = None, values: Mapping[str, str] = DEFAULT_SUBSTITUTIONS
) -> list[PanelQuery]:
    """All PromQL targets of the dashboard's panels, in panel order, variables substituted."""
    dashboard = load_dashboard() if dashboard is None else dashboard
    out = []
    for panel in iter_panels(dashboard):
        for t in panel.get("targets", []):
            raw = t.get("expr", "")
            if raw.strip():
                out.append(PanelQuery(panel.get("title", ""), t.get("refId", ""),
                                      t.get("legendFormat", ""), raw, substitute(raw, values)))
    return out


def expressions(dashboard: Mapping | None = None) -> list[str]:
    """The substituted expressions alone, deduplicated, in dashboard order."""
    return list(dict.fromkeys(q.expr for q in dashboard_queries(dashboard)))


# ---- metric names in an expression (a small lexer, not a full PromQL parser) ---------------------

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_LABEL_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan", "Inf", "NaN",
}


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (function names and labels excluded)."""
    s = _STRING.sub('""', expr)
    s = _LABEL_MATCHERS.sub(" ", s)
    s = _RANGE.sub(" ", s)
    s = _GROUPING.sub(" ", s)
    return {m for m in _IDENT.findall(s) if m not in _KEYWORDS}


def selectors(expr: str, metric: str) -> list[str]:
    """The label-matcher bodies used with `metric` in `expr`, e.g. ['model=~".*",stage="kept"']."""
    return re.findall(rf"(?<![\w:]){re.escape(metric)}\{{([^{{}}]*)\}}", expr)
