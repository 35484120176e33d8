"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from app.deps import ServiceDep
from app.errors import RETRY_AFTER_S, error_body

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: 200 while the process lives."""
    return {"status": "ok"}


@router.get("/ready", response_model=None)
async def ready(service: ServiceDep) -> JSONResponse:
    """Readiness: 200 once the model is loaded and warmed up, else 503."""
    if service.ready:
        return JSONResponse({"status": "ready", "model": service.model_name})
    message = f"model state: {service.state}" + (f" ({service.error})" if service.error else "")
    return JSONResponse(
        error_body("not_ready", message), status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)}
    )


@router.get("/metrics", response_class=Response)
async def metrics(service: ServiceDep) -> Response:
    """Prometheus text exposition."""
    body, content_type = service.metrics.render()
    return Response(body, media_type=content_type)
