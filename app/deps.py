"""FastAPI dependencies (the service, the pixel budget) and the API-key comparison."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr

from app.images import PixelBudget
from app.service import Service


def get_service(request: Request) -> Service:
    return request.app.state.service


def get_pixel_budget(request: Request) -> PixelBudget:
    return request.app.state.pixel_budget


ServiceDep = Annotated[Service, Depends(get_service)]
PixelBudgetDep = Annotated[PixelBudget, Depends(get_pixel_budget)]


def api_key_matches(authorization: str, expected: SecretStr) -> bool:
    """`Authorization: Bearer <key>` against the configured key, in constant time."""
    scheme, _, token = authorization.partition(" ")
    # Digests first, so that neither the content nor the length of the key leaks through timing.
    given = hashlib.sha256(token.strip().encode()).digest()
    wanted = hashlib.sha256(expected.get_secret_value().encode()).digest()
    return hmac.compare_digest(given, wanted) and scheme.lower() == "bearer"
