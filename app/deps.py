"""FastAPI dependencies: the service of this app, and the optional API-key check."""

from __future__ import annotations

import hashlib
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
    # Digests first, so that neither the content nor the length of the key leaks through timing.
    given = hashlib.sha256(token.strip().encode()).digest()
    wanted = hashlib.sha256(expected.get_secret_value().encode()).digest()
    if not hmac.compare_digest(given, wanted) or scheme.lower() != "bearer":
        raise ServiceError(401, "unauthorized", "missing or invalid API key", {"WWW-Authenticate": "Bearer"})
