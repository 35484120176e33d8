"""Structured JSON logs: one object per line, with the current HTTP request id when there is one.

Everything the service prints to stderr is JSON: our loggers, uvicorn's, Python warnings, and the
libraries that write to stderr themselves (transformers' own log handler and tqdm progress bars,
which are turned off for the process and its engine process, or wrapped line by line otherwise).
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from contextvars import ContextVar
from typing import Any, TextIO

request_id_var: ContextVar[str | None] = ContextVar("lightvlm_request_id", default=None)

_STANDARD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():  # `extra={...}` fields
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


# Read at import by huggingface_hub (hence transformers) in this process and in the engine
# process, which inherits the environment: no progress bars, whose \r-redrawn lines are not JSON.
QUIET_LIBRARY_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


class JsonLinesStderr(io.TextIOBase):
    """A stderr that passes JSON lines through and wraps any other line (a library writing to
    stderr directly) as a JSON object with logger "stderr"."""

    def __init__(self, target: TextIO) -> None:
        self.target = target
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.replace("\r", "\n").split("\n")
        for line in lines:
            self._emit(line)
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def fileno(self) -> int:
        return self.target.fileno()

    def _emit(self, line: str) -> None:
        if not line.strip():
            return
        if not line.startswith("{"):
            line = json.dumps({"ts": _now(), "level": "info", "logger": "stderr", "message": line.strip()},
                              ensure_ascii=False)  # fmt: skip
        self.target.write(line + "\n")
        self.target.flush()


def _now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def configure_logging(level: str = "info") -> None:
    """Route every logger (ours, uvicorn's, the engine's, Python warnings) to stderr as JSON lines."""
    for name, value in QUIET_LIBRARY_ENV.items():
        os.environ.setdefault(name, value)
    if not isinstance(sys.stderr, JsonLinesStderr):
        sys.stderr = JsonLinesStderr(sys.stderr)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
