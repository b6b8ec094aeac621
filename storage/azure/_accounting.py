"""Counting the storage requests the backend makes, by kind (cost and performance tests)."""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from azure.core.pipeline import PipelineRequest
from azure.core.pipeline.policies import SansIOHTTPPolicy

KINDS = (
    "table.read",
    "table.write",
    "table.batch",
    "table.query",
    "queue.send",
    "queue.receive",
    "queue.delete",
    "queue.update",
    "blob.read",
    "blob.write",
    "other",
)


# Benchmarks count the requests of a process they start (``durable start``) by naming a file here:
# every backend of that process counts into one counter, which writes its totals there.
COUNTS_FILE_SETTING = "DURABLE_STORAGE_REQUEST_COUNTS"


class StorageRequestCounter(SansIOHTTPPolicy):  # type: ignore[type-arg]
    """Counts every HTTP request (every attempt, retries included) the storage clients send.

    It is installed on each client's pipeline as the request hook (``raw_request_hook``, which runs
    after the retry policy, so each attempt is one count). The service a request goes to is told
    by its endpoint: production host names carry it (``.table.``, ``.queue.``, ``.blob.``), and
    emulator endpoints are registered by the backend (``register_endpoint``).
    """

    def __init__(self, dump_to: Path | None = None) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self._endpoints: dict[str, str] = {}
        self._lock = threading.Lock()
        self._dump_to = dump_to
        self._dumped_at = 0.0

    # -- results ------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()

    # -- wiring ---------------------------------------------------------------------------------
    def register_endpoint(self, url: str, service: str) -> None:
        """Remember that requests to ``url``'s host:port go to ``service`` (table/queue/blob)."""
        self._endpoints[urlsplit(url).netloc.lower()] = service

    def hook(self, request: PipelineRequest[Any]) -> None:
        self.on_request(request)

    def on_request(self, request: PipelineRequest[Any]) -> None:
        http = request.http_request
        kind = self.classify(http.method, http.url)
        with self._lock:
            self.counts[kind] += 1
        if self._dump_to is not None and time.monotonic() - self._dumped_at >= DUMP_INTERVAL:
            self.dump()

    def dump(self) -> None:
        """Write the totals and the time to the counts file (atomically: readers never see half)."""
        if self._dump_to is None:
            return
        self._dumped_at = time.monotonic()
        partial = self._dump_to.with_suffix(".partial")
        partial.write_text(json.dumps({"time": time.time(), "counts": self.snapshot()}))
        partial.replace(self._dump_to)

    # -- classification -------------------------------------------------------------------------
    def _service(self, netloc: str) -> str | None:
        netloc = netloc.lower()
        if netloc in self._endpoints:
            return self._endpoints[netloc]
        host = netloc.split(":")[0]
        for service in ("table", "queue", "blob"):
            if f".{service}." in host:
                return service
        return None

    def classify(self, method: str, url: str) -> str:
        parts = urlsplit(url)
        method = method.upper()
        path = unquote(parts.path)
        query = {k.lower(): v for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        service = self._service(parts.netloc)
        if service is None:
            # Unknown endpoint: guess from the path shape.
            if path.endswith("$batch") or "(" in path or path.endswith("/Tables"):
                service = "table"
            elif "/messages" in path:
                service = "queue"
            else:
                return "other"
        if service == "table":
            return _classify_table(method, path)
        if service == "queue":
            return _classify_queue(method, path, query)
        return _classify_blob(method, query)


DUMP_INTERVAL = 0.5  # seconds between writes of the counts file, at most
_shared: StorageRequestCounter | None = None


def counter_from_environment() -> StorageRequestCounter | None:
    """The process-wide counter that writes to the file ``DURABLE_STORAGE_REQUEST_COUNTS`` names, if set."""
    global _shared
    path = os.environ.get(COUNTS_FILE_SETTING)
    if not path:
        return None
    if _shared is None:
        _shared = StorageRequestCounter(Path(path))
    return _shared


def _classify_table(method: str, path: str) -> str:
    last = path.rstrip("/").rsplit("/", 1)[-1]
    if last == "$batch":
        return "table.batch"
    if last.startswith("Tables"):
        return "other"  # table create / delete / list
    if "PartitionKey=" in last and "RowKey=" in last:
        return "table.read" if method == "GET" else "table.write"
    if method == "GET":
        return "table.query"
    if method in ("POST", "PUT", "MERGE", "PATCH", "DELETE"):
        return "table.write"
    return "other"


def _classify_queue(method: str, path: str, query: dict[str, list[str]]) -> str:
    segments = [s for s in path.split("/") if s]
    if "messages" not in segments:
        return "other"  # queue create / delete / metadata
    after = segments[segments.index("messages") + 1 :]
    if method == "POST":
        return "queue.send"
    if method == "GET":
        return "other" if query.get("peekonly") == ["true"] else "queue.receive"
    if method == "DELETE":
        return "queue.delete" if after else "other"  # DELETE .../messages clears the queue
    if method == "PUT" and after:
        return "queue.update"
    return "other"


def _classify_blob(method: str, query: dict[str, list[str]]) -> str:
    if "restype" in query:
        if query.get("comp") == ["list"]:
            return "blob.read"
        return "other"  # container create / delete / properties
    if method in ("GET", "HEAD"):
        return "blob.read"
    if method in ("PUT", "DELETE"):
        return "blob.write"
    return "other"
