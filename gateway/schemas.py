"""REST request and response shapes (pydantic). The same classes validate requests
and generate `/openapi.json`, so the document cannot drift from the code."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from domain.chat import MAX_BODY_CHARS, MAX_HISTORY_LIMIT
from domain.currency import is_currency
from protocol.bounds import INT_MAX

MAX_METADATA_BYTES = 4 * 1024
MAX_METADATA_DEPTH = 16
MAX_RATE = 10**7
MAX_GUESTS = 50
UserId = Field(min_length=1, max_length=128)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


class CreateSession(BaseModel):
    model_config = ConfigDict(extra="forbid")

    payer: str = UserId
    provider: str = UserId
    rate_per_minute: int = Field(ge=0, le=MAX_RATE, strict=True, description="minor units of currency per minute")
    currency: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code")
    guests: list[str] = Field(default_factory=list, max_length=MAX_GUESTS)
    max_amount_minor: int | None = Field(default=None, ge=1, le=10**12, strict=True, description="prepaid budget")
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("currency")
    @classmethod
    def _currency(cls, currency: str) -> str:
        if not is_currency(currency):
            raise ValueError(f"{currency} is not an ISO 4217 currency code")
        return currency

    @field_validator("guests")
    @classmethod
    def _guests(cls, guests: list[str]) -> list[str]:
        for guest in guests:
            if not 1 <= len(guest) <= 128:
                raise ValueError("each guest must be 1 to 128 characters")
        return list(dict.fromkeys(guests))

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        if len(orjson.dumps(metadata)) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata must be at most {MAX_METADATA_BYTES} bytes of JSON")
        if _depth(metadata) > MAX_METADATA_DEPTH:
            raise ValueError(f"metadata nests deeper than {MAX_METADATA_DEPTH}")
        return metadata

    @model_validator(mode="after")
    def _distinct(self) -> CreateSession:
        if self.payer == self.provider:
            raise ValueError("payer and provider must be different users")
        return self


class Session(BaseModel):
    id: str
    payer: str
    provider: str
    guests: list[str]
    rate_per_minute: int
    currency: str
    max_amount_minor: int | None
    state: Literal["scheduled", "active", "ended", "cancelled"]
    created_at: str
    started_at: str | None
    ended_at: str | None
    end_reason: str | None
    metadata: dict[str, Any]


class SessionList(BaseModel):
    items: list[Session]
    next_cursor: str | None


class ListSessionsQuery(BaseModel):
    state: Literal["scheduled", "active", "ended", "cancelled"] | None = None
    cursor: str | None = None
    limit: int = Field(default=50, ge=1, le=200)


class Billing(BaseModel):
    session: str
    billable_ms: int
    amount_minor: int
    currency: str
    rate_per_minute: int
    segments: list[dict[str, Any]]
    final: bool


class TimelineEntry(BaseModel):
    at: str
    kind: str
    actor: str
    detail: dict[str, Any]


class Timeline(BaseModel):
    items: list[TimelineEntry]


class SendMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    client_id: str = Field(min_length=1, max_length=128)
    body: str = Field(min_length=1, max_length=MAX_BODY_CHARS)


class EditMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    body: str = Field(min_length=1, max_length=MAX_BODY_CHARS)


class Message(BaseModel):
    id: str
    seq: int
    client_id: str
    sender: str
    body: str | None
    created_at: str
    edited_at: str | None
    deleted: bool


class MessageList(BaseModel):
    items: list[Message]


class MessagesQuery(BaseModel):
    after_seq: int | None = Field(default=None, ge=0, le=INT_MAX)
    before_seq: int | None = Field(default=None, ge=0, le=INT_MAX)
    limit: int = Field(default=50, ge=1, le=MAX_HISTORY_LIMIT)


class IceServer(BaseModel):
    urls: list[str]
    username: str | None = None
    credential: str | None = None


class IceServers(BaseModel):
    ice_servers: list[IceServer]
    ttl: int | None = None


class ErrorBody(BaseModel):
    code: str
    message: str
    state: str | None = None


class Error(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str
    error: ErrorBody | None = None


class DevToken(BaseModel):
    token: str
    user: str
    admin: bool
