"""Who is asking, as the edge authenticated them (PRODUCT.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    user: str
    is_admin: bool = False
