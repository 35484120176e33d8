"""Layer boundaries (app/ never touches model internals; the scheduler knows no HTTP) and JSON logs."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

from app.logs import JsonFormatter, request_id_var

ROOT = Path(__file__).resolve().parents[2]
# What app/ may import from lightvlm_core: the plain types, typed errors, the scheduler, and
# load_engine (the one entry point to build an engine).
APP_ALLOWED_CORE = {"lightvlm_core", "lightvlm_core.types", "lightvlm_core.errors", "lightvlm_core.scheduler",
                    "lightvlm_core.cli"}  # app/cli.py hands non-serve subcommands to the core CLI


def imported_modules(path: Path) -> set[str]:
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
            if top == "lightvlm_core" and module != "lightvlm_core.engine":
                assert module in APP_ALLOWED_CORE, f"{path} imports {module}"
            if module == "lightvlm_core.engine":
                assert path.name == "service.py", f"{path} imports the engine"


def test_scheduler_knows_no_http_or_metrics_library() -> None:
    for name in ("scheduler.py", "scheduler_api.py"):
        modules = imported_modules(ROOT / "lightvlm_core" / name)
        assert not {m.split(".")[0] for m in modules} & {
            "fastapi",
            "starlette",
            "prometheus_client",
            "app",
            "torch",
        }, name


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
