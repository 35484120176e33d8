"""Fixtures for the service tests: started apps over a fake engine."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_fakes import FakeEngine
from service_helpers import make_settings

from app.main import create_app


@pytest.fixture
def make_client() -> Iterator[Callable[..., tuple[TestClient, FakeEngine]]]:
    """make_client(engine=None, **settings) -> (started TestClient, its fake engine)."""
    stack = contextlib.ExitStack()

    def make(engine: FakeEngine | None = None, **settings: Any) -> tuple[TestClient, FakeEngine]:
        engine = engine or FakeEngine()
        client = stack.enter_context(TestClient(create_app(make_settings(**settings), engine=engine)))
        return client, engine

    with stack:
        yield make


@pytest.fixture
def client(make_client: Callable[..., tuple[TestClient, FakeEngine]]) -> TestClient:
    return make_client()[0]
