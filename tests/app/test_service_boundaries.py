"""Layer boundaries (app/ never touches model internals; the scheduler knows no HTTP) and JSON logs."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

from app.logs import JsonFormatter, request_id_var

ROOT = Path(__file__).resolve().parents[2]
# What app/ may import from lightvlm_core: the client (EngineClient and its stream, stats and
# observer types), the plain types and the typed errors; app/cli.py hands other subcommands on.
APP_ALLOWED_CORE = {"lightvlm_core", "lightvlm_core.types", "lightvlm_core.errors", "lightvlm_core.client",
                    "lightvlm_core.cli"}
SERVICE_LIBRARIES = {"fastapi", "starlette", "prometheus_client", "uvicorn", "app"}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at module level or inside functions."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def test_app_uses_only_the_narrow_core_interface() -> None:
    for path in sorted((ROOT / "app").rglob("*.py")):
        for module in imported_modules(path):
            top = module.split(".")[0]
            assert top not in ("torch", "transformers"), f"{path} imports {module}"
            if top == "lightvlm_core":
                cli_helper = path.name == "cli.py" and module.startswith("lightvlm_core.cli")
                assert module in APP_ALLOWED_CORE or cli_helper, f"{path} imports {module}"


def test_no_part_of_the_core_knows_http_or_the_metrics_library() -> None:
    paths = sorted((ROOT / "lightvlm_core").rglob("*.py"))
    assert len(paths) > 20
    for path in paths:
        tops = {m.split(".")[0] for m in imported_modules(path)}
        assert not tops & SERVICE_LIBRARIES, f"{path} imports {tops & SERVICE_LIBRARIES}"


def test_the_scheduler_is_pure_policy() -> None:
    tops = {m.split(".")[0] for m in imported_modules(ROOT / "lightvlm_core" / "scheduler.py")}
    assert not tops & {"torch", "threading", "asyncio", "multiprocessing", "time"}, tops


def test_json_log_lines_carry_the_request_id() -> None:
    formatter = JsonFormatter()
    record = logging.makeLogRecord(
        {"name": "t", "levelno": 20, "levelname": "INFO", "msg": "hi %s", "args": ("x",)}
    )
    token = request_id_var.set("rid-1")
    try:
        entry = json.loads(formatter.format(record))
    finally:
        request_id_var.reset(token)
    assert entry["message"] == "hi x" and entry["request_id"] == "rid-1" and entry["level"] == "info"
    record.status = 200  # an `extra=` field
    assert json.loads(formatter.format(record))["status"] == 200
