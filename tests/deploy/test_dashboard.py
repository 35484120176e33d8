"""Static checks of Grafana's provisioning and the dashboard's queries against the metrics
contract (the same contract as ARCHITECTURE.md's table)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_files import COMPOSE, GRAFANA, PROMETHEUS_YML, compose_env, load_yaml, mounts  # noqa: E402
from promql import (  # noqa: E402
    CONTRACT_METRICS,
    DASHBOARD_METRICS,
    DASHBOARD_PATH,
    REPO_ROOT,
    dashboard_queries,
    exposed_series_names,
    iter_panels,
    load_dashboard,
    metric_names,
    substitute,
)


# ---- Grafana provisioning -------------------------------------------------------------------------


def test_grafana_datasource_points_at_compose_prometheus():
    files = sorted((GRAFANA / "provisioning" / "datasources").glob("*.yml"))
    assert files
    datasources = [d for f in files for d in load_yaml(f)["datasources"]]
    prom = [d for d in datasources if d["type"] == "prometheus"]
    assert len(prom) == 1 and prom[0]["isDefault"] is True
    assert prom[0]["url"] == "http://prometheus:9090"
    assert prom[0]["jsonData"]["timeInterval"] == load_yaml(PROMETHEUS_YML)["global"]["scrape_interval"]
    ds_var = next(v for v in load_dashboard()["templating"]["list"] if v["type"] == "datasource")
    assert ds_var["current"]["value"] == prom[0]["uid"]


def test_grafana_dashboard_provider_reads_mounted_folder():
    files = sorted((GRAFANA / "provisioning" / "dashboards").glob("*.yml"))
    assert files
    providers = [p for f in files for p in load_yaml(f)["providers"]]
    assert len(providers) == 1 and providers[0]["type"] == "file"
    path = providers[0]["options"]["path"]
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    assert mounts(grafana)[path] == "./docker/grafana/dashboards"
    home = compose_env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(path + "/")
    assert (REPO_ROOT / "docker/grafana/dashboards" / home[len(path) + 1:]) == DASHBOARD_PATH


# ---- dashboard ------------------------------------------------------------------------------------


def norm(expr: str) -> str:
    return re.sub(r"\s+", "", expr)


def panel(title: str) -> dict:
    found = [p for p in iter_panels(load_dashboard()) if p["title"] == title and p["type"] != "row"]
    assert len(found) == 1, f"expected one panel titled {title!r}, found {len(found)}"
    return found[0]


def panel_exprs(title: str) -> list[str]:
    return [norm(t["expr"]) for t in panel(title)["targets"]]


def quantile_expr(q: float, histogram: str) -> str:
    return norm(f'histogram_quantile({q}, sum by (le) (rate({histogram}_bucket{{model=~"$model"}}'
                f"[$__rate_interval])))")


def test_dashboard_json_is_generated_from_script():
    sys.path.insert(0, str(GRAFANA))
    try:
        import build_dashboard
    finally:
        sys.path.remove(str(GRAFANA))
    assert DASHBOARD_PATH.read_text() == build_dashboard.render(), (
        "lightvlm.json is stale: run `python docker/grafana/build_dashboard.py`")


def test_dashboard_has_model_variable():
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"]
    model = [v for v in dashboard["templating"]["list"] if v["name"] == "model"]
    assert len(model) == 1
    var = model[0]
    assert var["type"] == "query"
    assert var["definition"] == "label_values(lightvlm_model_info, model)"
    assert var["includeAll"] and var["allValue"] == ".*"


LATENCY_PANELS = {
    "Prefill latency": "lightvlm_prefill_seconds",
    "Time to first token": "lightvlm_time_to_first_token_seconds",
    "Inter-token latency": "lightvlm_inter_token_latency_seconds",
    "End-to-end request latency": "lightvlm_e2e_request_latency_seconds",
    "Queue time": "lightvlm_queue_time_seconds",
}


@pytest.mark.parametrize("title", sorted(LATENCY_PANELS))
def test_latency_panel_quantiles(title):
    histogram = LATENCY_PANELS[title]
    exprs = panel_exprs(title)
    for q in (0.5, 0.95, 0.99):
        assert quantile_expr(q, histogram) in exprs, (title, q)
    assert panel(title)["fieldConfig"]["defaults"]["unit"] == "s"


def rate_expr(counter: str, extra: str = "", by: str = "") -> str:
    matchers = 'model=~"$model"' + (f",{extra}" if extra else "")
    return norm(f"sum{f' by ({by})' if by else ''}(rate({counter}{{{matchers}}}[$__rate_interval]))")


REQUIRED_PANELS = {
    "Token throughput": [rate_expr("lightvlm_generation_tokens_total")],
    "Requests running / waiting": [norm('sum(lightvlm_requests_running{model=~"$model"})'),
                                   norm('sum(lightvlm_requests_waiting{model=~"$model"})')],
    "Batch size": [quantile_expr(0.5, "lightvlm_batch_size"), quantile_expr(0.95, "lightvlm_batch_size")],
    "KV-cache bytes": [norm('sum(lightvlm_kv_cache_bytes{model=~"$model"})')],
    "KV-cache tokens": [norm('sum(lightvlm_kv_cache_tokens{model=~"$model"})')],
    "KV entries evicted / s": [rate_expr("lightvlm_kv_cache_evicted_tokens_total")],
    "Image tokens kept ratio": [rate_expr("lightvlm_image_tokens_total", 'stage="kept"') + "/"
                                + rate_expr("lightvlm_image_tokens_total", 'stage="input"')],
    "Finish reasons": [rate_expr("lightvlm_requests_total", by="finish_reason")],
    "Rejections by reason": [rate_expr("lightvlm_requests_rejected_total", by="reason")],
}


@pytest.mark.parametrize("title", sorted(REQUIRED_PANELS))
def test_required_panel_queries(title):
    exprs = panel_exprs(title)
    for expected in REQUIRED_PANELS[title]:
        assert expected in exprs, (title, expected, exprs)


def test_panel_units():
    assert panel("KV-cache bytes")["fieldConfig"]["defaults"]["unit"] == "bytes"
    assert panel("Image tokens kept ratio")["fieldConfig"]["defaults"]["unit"] == "percentunit"


def test_every_queried_metric_is_in_the_contract():
    allowed = exposed_series_names(DASHBOARD_METRICS)  # the design doc's table + issue 18's two
    used = set()
    for q in dashboard_queries():
        names = metric_names(q.raw)
        assert names, f"{q.panel}/{q.ref_id}: no metric in {q.raw}"
        unknown = names - allowed
        assert not unknown, f"{q.panel}/{q.ref_id} queries non-contract metrics {unknown}"
        used |= names
    # ...and every contract metric is on the dashboard somewhere.
    for name, kind in DASHBOARD_METRICS.items():
        assert any(u.startswith(name) for u in used), f"{name} ({kind}) is on no panel"


def test_every_selector_filters_on_model():
    for q in dashboard_queries():
        for m in re.finditer(r"(?<![\w:])(lightvlm_\w+)(\{[^}]*\})?", q.raw):
            assert m.group(2) and 'model=~"$model"' in m.group(2), f"{q.panel}: {m.group(0)}"


def test_grid_layout_has_no_overlaps():
    cells: dict[tuple[int, int], int] = {}
    ids, titles = set(), set()
    for p in iter_panels(load_dashboard()):
        assert p["id"] not in ids and p["title"] not in titles, p["title"]
        ids.add(p["id"])
        titles.add(p["title"])
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {p['id']} overlap"
                cells[(x, y)] = p["id"]


# ---- promql helper --------------------------------------------------------------------------------


def test_promql_helper_substitutes_and_extracts():
    queries = dashboard_queries()
    assert len(queries) >= 20
    for q in queries:
        assert "$" not in q.expr
        if "rate(" in q.expr:
            assert "[1m]" in q.expr
        assert 'model=~".*"' in q.expr
    assert substitute('x{model=~"${model}"}[$__rate_interval]') == 'x{model=~".*"}[1m]'
    with pytest.raises(KeyError):
        substitute("x{a=\"$unknown\"}")
    assert metric_names(
        'sum by (le) (rate(a_bucket{model=~".*",stage="in"}[1m])) / on (model) group_left b_total offset 5m'
    ) == {"a_bucket", "b_total"}
    assert metric_names('histogram_quantile(0.99, sum(rate(x_bucket[1m])) by (le))') == {"x_bucket"}


def test_contract_matches_architecture_doc():
    """The contract above is the table in the design doc (shared/ beside the repo or inside it)."""
    candidates = [REPO_ROOT / "shared/design/ARCHITECTURE.md",
                  REPO_ROOT.parent / "shared/design/ARCHITECTURE.md"]
    doc = next((p for p in candidates if p.is_file()), None)
    if doc is None:
        pytest.skip("ARCHITECTURE.md not found beside the repo")
    table: dict[str, str] = {}
    for line in doc.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("lightvlm_"):
            continue
        kind = cells[1].split(",")[0].split()[0]
        for name in (n.strip() for n in cells[0].split("/")):
            if kind == "counter" and name.endswith("_total"):
                name = name[: -len("_total")]
            table[name] = kind
    assert table == CONTRACT_METRICS
