"""Durable HTTP (``context.call_http``): the request an orchestration records, the response it
gets back, and the 202 polling rules. The request itself is made by the runtime's built-in HTTP
activity (``durable.runtime._registry``), so that orchestrator code stays free of I/O."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

from ._errors import OrchestrationApiMisuse

# The activity name Durable Functions gives its built-in HTTP action.
HTTP_ACTIVITY_NAME = "BuiltIn::HttpActivity"
# Between polls of a 202 answer without Retry-After (Durable Functions' default).
DEFAULT_POLL_INTERVAL = timedelta(seconds=30)


class TokenSource:
    """Where ``call_http`` gets an OAuth token for the request's ``Authorization`` header."""

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError


class ManagedIdentityTokenSource(TokenSource):
    """A token for ``resource`` (e.g. ``https://management.core.windows.net/.default``) from the
    app's managed identity."""

    def __init__(self, resource: str) -> None:
        if not isinstance(resource, str) or not resource:
            raise ValueError("ManagedIdentityTokenSource needs a resource")
        self.resource = resource

    def to_json(self) -> dict[str, Any]:
        return {"kind": "AzureManagedIdentity", "resource": self.resource}


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value, whatever the case of its name."""
    wanted = name.casefold()
    return next((value for key, value in headers.items() if key.casefold() == wanted), None)


@dataclass(frozen=True)
class DurableHttpRequest:
    method: str
    uri: str
    content: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    token_source: dict[str, Any] | None = None  # TokenSource.to_json()

    @classmethod
    def build(
        cls,
        method: str,
        uri: str,
        content: str | None,
        headers: Mapping[str, str] | None,
        token_source: TokenSource | None,
    ) -> DurableHttpRequest:
        """Check what orchestrator code asked for, so that a bad request fails where it is made."""
        if not isinstance(method, str) or not method.strip() or not method.strip().isalpha():
            raise OrchestrationApiMisuse(f"call_http needs an HTTP method such as 'GET', got {method!r}")
        parts = urlsplit(uri) if isinstance(uri, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise OrchestrationApiMisuse(f"call_http needs an absolute http(s) URI, got {uri!r}")
        if headers is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise OrchestrationApiMisuse("call_http headers must map strings to strings")
        if token_source is not None and not isinstance(token_source, TokenSource):
            raise OrchestrationApiMisuse(f"call_http token_source must be a TokenSource, got {token_source!r}")
        return cls(
            method.strip().upper(),
            uri,
            content,
            dict(headers or {}),
            token_source.to_json() if token_source is not None else None,
        )

    def to_json(self) -> str:
        data = {"method": self.method, "uri": self.uri, "content": self.content, "headers": self.headers}
        if self.token_source is not None:
            data["tokenSource"] = self.token_source
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> DurableHttpRequest:
        """The request as the built-in activity gets it (its decoded input)."""
        try:
            return cls(
                data["method"], data["uri"], data.get("content"), data.get("headers") or {}, data.get("tokenSource")
            )
        except (TypeError, AttributeError, KeyError) as exc:
            raise ValueError(f"malformed durable HTTP request: {exc!r}") from None

    def poll(self, response: DurableHttpResponse) -> DurableHttpRequest | None:
        """The GET that follows a 202 answer with a ``Location`` (the asynchronous operation's
        status), or None when the answer is final."""
        location = header(response.headers, "Location")
        if response.status_code != 202 or not location:
            return None
        return DurableHttpRequest("GET", urljoin(self.uri, location), None, self.headers, self.token_source)


class DurableHttpResponse(dict[str, Any]):
    """The answer to ``call_http``: a dict with the official SDK's keys (``response["statusCode"]``,
    ``["headers"]``, ``["content"]``), so it is plain JSON wherever it goes, and readable as
    attributes too (``status_code``, ``headers``, ``content``)."""

    def __init__(self, status_code: int, headers: Mapping[str, str] | None = None, content: str | None = None) -> None:
        super().__init__(statusCode=status_code, headers=dict(headers or {}), content=content)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DurableHttpResponse:
        return cls(int(data["statusCode"]), data.get("headers"), data.get("content"))

    @property
    def status_code(self) -> int:
        return int(self["statusCode"])

    @property
    def headers(self) -> dict[str, str]:
        return dict(self["headers"])

    @property
    def content(self) -> str | None:
        content: str | None = self["content"]
        return content

    def retry_after(self, now: datetime) -> timedelta:
        """How long to wait before polling again: ``Retry-After`` in seconds or as an HTTP date."""
        value = (header(self.headers, "Retry-After") or "").strip()
        if value.isdigit():
            return timedelta(seconds=int(value))
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return DEFAULT_POLL_INTERVAL
        return max(when - now, timedelta(0)) if when.tzinfo is not None else DEFAULT_POLL_INTERVAL
