"""FastAPI dependencies: the service of this app, and the optional API-key check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from app.errors import ServiceError
from app.service import Service


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def require_api_key(request: Request, service: ServiceDep) -> None:
    """When LIGHTVLM_API_KEY is set, demand `Authorization: Bearer <key>` (constant-time compare)."""
    expected = service.settings.api_key
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), expected.get_secret_value().encode()
    ):
        raise ServiceError(401, "unauthorized", "missing or invalid API key", {"WWW-Authenticate": "Bearer"})
