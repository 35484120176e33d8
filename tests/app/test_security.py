"""Security defaults: constant-time API key check, no remote code or pickle by default, CORS off
unless configured, and a schemathesis fuzz of the OpenAPI schema (real engine) with no 5xx."""

from __future__ import annotations

import ast
import hmac
import importlib
import os
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from service_fakes import FakeEngine
from service_helpers import live_server, make_settings, wait_for

from app import deps
from app.main import create_app
from lightvlm_core import loading


def _import_all_of(package: Any) -> None:
    """Import every submodule now, at collection. CPython 3.11 can fail to compile a module
    (SystemError: AST constructor recursion depth mismatch) after a RecursionError in the same
    process, and the round-2 battery provokes RecursionErrors in the in-process server on purpose;
    schemathesis imports some modules lazily, during the fuzz run."""
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        try:
            importlib.import_module(info.name)
        except Exception:  # optional integrations (e.g. a missing extra) are not ours to load
            pass


_import_all_of(schemathesis)
from lightvlm_core.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[2]
MakeClient = Callable[..., tuple[TestClient, FakeEngine]]


def test_api_key_is_compared_in_constant_time(make_client: MakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real_compare = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)
    client, _ = make_client(api_key="s3cret-key")
    body = {"prompt": "x", "max_new_tokens": 1, "stream": False}
    for key, status in (("s", 401), ("s3cret-kez", 401), ("s3cret-key" * 50, 401), ("s3cret-key", 200)):
        response = client.post("/generate", json=body, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == status, key
    assert client.post("/generate", json=body, headers={"Authorization": "Basic s3cret-key"}).status_code == 401
    # every check went through compare_digest, on fixed-length digests whatever the key's length
    assert len(compared) == 5 and all(len(a) == len(b) == 32 for a, b in compared)


def test_no_remote_code_and_no_pickle_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert make_settings().trust_remote_code is False
    calls: dict[str, dict[str, Any]] = {}

    def recorder(name: str, fail: bool = False) -> type:
        class Auto:
            @staticmethod
            def from_pretrained(*args: Any, **kwargs: Any) -> object:
                calls[name] = kwargs
                if fail:
                    raise OSError("stop here")
                return object()

        return Auto

    monkeypatch.setattr(loading, "AutoConfig", recorder("config"))
    monkeypatch.setattr(loading, "AutoProcessor", recorder("processor"))
    monkeypatch.setattr(loading, "AutoModelForImageTextToText", recorder("model", fail=True))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError):
        loading.load_model(str(tmp_path), device="cpu")
    assert {name: kw["trust_remote_code"] for name, kw in calls.items()} == dict.fromkeys(
        ("config", "processor", "model"), False
    )
    assert calls["model"]["use_safetensors"] is True
    # a directory with only a pickle checkpoint is refused before anything is read
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelLoadError, match="pickle"):
        loading.load_model(str(pickled), device="cpu")


def test_serving_code_never_unpickles() -> None:
    # lightvlm_core/demo is the training script (it resumes its own checkpoints), not the service
    paths = [*(ROOT / "app").rglob("*.py"), *(ROOT / "lightvlm_core").rglob("*.py")]
    for path in paths:
        if "demo" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not {"pickle", "dill", "cloudpickle"} & set(names), path
            if isinstance(node, ast.Attribute) and node.attr == "load" and getattr(node.value, "id", "") == "torch":
                pytest.fail(f"{path} calls torch.load")


def test_cors_preflight_is_refused_unless_configured(make_client: MakeClient) -> None:
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    client, _ = make_client()
    response = client.options("/generate", headers=preflight)
    assert response.status_code == 405 and "access-control-allow-origin" not in response.headers
    client, _ = make_client(cors_origins="https://app.example")
    assert "access-control-allow-origin" not in client.options("/generate", headers=preflight).headers
    allowed = client.options("/generate", headers={**preflight, "Origin": "https://app.example"})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"


# per operation and generation mode (positive, negative); raise it for a deeper run
FUZZ_EXAMPLES = int(os.environ.get("LIGHTVLM_FUZZ_EXAMPLES", "50"))


def test_openapi_fuzz_never_answers_5xx(tiny_model_dir: Callable[[str], Path]) -> None:
    """schemathesis generates valid and invalid requests for every operation in /openapi.json;
    the real engine (tiny llava) serves them. Nothing may come back as a 5xx."""
    settings = make_settings(
        model=str(tiny_model_dir("llava")), device="cpu", dtype="float32", warmup=False,
        max_new_tokens=16, max_queue=256,
    )  # fmt: skip
    with live_server(create_app(settings)) as base_url:
        wait_for(lambda: httpx.get(f"{base_url}/ready").status_code == 200, timeout=120)
        schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
        statuses: dict[str, dict[int, int]] = {}
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                seen = statuses.setdefault(f"{operation.label} {mode.value}", {})
                try:
                    fuzz(operation, mode, base_url, seen)()
                except hypothesis.errors.Unsatisfiable:  # no parameters: nothing invalid to generate
                    pass
        assert httpx.get(f"{base_url}/ready").status_code == 200
    print(statuses)
    generate = statuses["POST /generate positive"]
    assert generate.get(200, 0) > 0 and sum(generate.values()) >= FUZZ_EXAMPLES // 2, statuses


def fuzz(operation: Any, mode: GenerationMode, base_url: str, seen: dict[int, int]) -> Callable[[], None]:
    @hypothesis.settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def call(case: schemathesis.Case) -> None:
        response = case.call(base_url=base_url, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

    return call
