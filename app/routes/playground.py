"""The playground: `GET /` (a page that needs no build step), its static files, the sample scenes
it offers in one click, and what it needs to know about the service. None of these need the API
key (the page asks for it and sends it with every generation request)."""

from __future__ import annotations

import json
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response

from app.deps import ServiceDep
from app.errors import ServiceError
from app.schemas import PresetName

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# examples/: scene-<seed>.png (lightvlm make-scene --seed N) and questions.json; read from the
# files, so the API process needs nothing of the engine's demo code
# (a checkout, else the working directory: the Docker image's /opt/lightvlm/examples)
EXAMPLES_DIR = next((d for d in (Path(__file__).resolve().parents[2] / "examples", Path.cwd() / "examples")
                     if d.is_dir()), Path.cwd() / "examples")
# The five question patterns the demo model was trained on (lightvlm_core/demo/scenes.py).
QUESTION_PATTERNS = (
    "What color is the circle?",
    "What shape is the red object?",
    "How many squares are there?",
    "Is there a blue triangle?",
    "Describe the image.",
)
_NO_CACHE = {"Cache-Control": "no-cache"}  # a new release must not run an old page


@router.get("/")
def playground_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type=_MEDIA_TYPES[".html"], headers=_NO_CACHE)


@router.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    """Only the files that app/static holds, by plain name (no paths)."""
    path = STATIC_DIR / name
    media_type = _MEDIA_TYPES.get(path.suffix)
    if "/" in name or name.startswith(".") or media_type is None or not path.is_file():
        raise ServiceError(404, "not_found", f"no static file {name!r}")
    return FileResponse(path, media_type=media_type, headers=_NO_CACHE)


@router.get("/playground/config")
def playground_config(service: ServiceDep) -> JSONResponse:
    settings = service.settings
    return JSONResponse(
        {
            "model": service.model_name,
            "ready": service.ready,
            "presets": list(typing.get_args(PresetName)),
            "default_preset": settings.preset,
            "api_key_required": settings.api_key is not None,
            "max_new_tokens": min(64, settings.max_new_tokens),
            "question_patterns": list(QUESTION_PATTERNS),
        }
    )


@router.get("/playground/samples")
def playground_samples() -> list[dict[str, Any]]:
    return list(_samples().values())


@router.get("/playground/samples/{name}.png")
def playground_sample_image(name: str) -> Response:
    if name not in _samples():
        raise ServiceError(404, "not_found", f"no sample {name!r}")
    return Response((EXAMPLES_DIR / f"{name}.png").read_bytes(), media_type="image/png",
                    headers={"Cache-Control": "max-age=3600"})


@lru_cache(maxsize=1)
def _samples() -> dict[str, dict[str, Any]]:
    """name -> {name, url, objects, questions} of every example scene (none if examples/ is absent)."""
    path = EXAMPLES_DIR / "questions.json"
    if not path.is_file():
        return {}
    samples = {}
    for entry in json.loads(path.read_text()):
        name = Path(entry["image"]).stem
        samples[name] = {"name": name, "url": f"/playground/samples/{name}.png", "objects": entry["objects"],
                         "questions": entry["questions"]}
    return samples
