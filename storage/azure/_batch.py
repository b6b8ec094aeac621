"""A lean encoder for table transactions (entity group transactions).

``TableClient.submit_transaction`` formats each operation as a full HTTP request through
``http.client`` and parses the multipart answer with the ``email`` package; for the commit of a
step (a few dozen rows) that is most of the worker's CPU time per step. The wire format is small
and documented ("Performing entity group transactions"), so commits write it directly and send it
through the table client's own pipeline (same authentication, retries and request accounting).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from azure.core.exceptions import HttpResponseError
from azure.core.rest import HttpRequest
from azure.data.tables._serialize import _add_entity_properties, _prepare_key
from azure.data.tables.aio import TableClient

_STATUS = re.compile(r"^HTTP/1\.1 (\d{3})", re.MULTILINE)
_ETAG = re.compile(r"^ETag: (.+?)\r?$", re.MULTILINE | re.IGNORECASE)


class BatchConflict(Exception):
    """An operation's precondition failed (409 exists, 412 ETag, 404 missing): nothing was written."""


@dataclass(frozen=True)
class BatchOperation:
    kind: str  # "upsert" (insert or replace), "create" (insert), "replace" (under ``etag``)
    entity: dict[str, Any]
    etag: str | None = None


async def submit(table: TableClient, operations: Sequence[BatchOperation]) -> list[str]:
    """Run the operations as one atomic transaction; returns each operation's new ETag."""
    account_url = table.url.rstrip("/")
    base = f"{account_url}/{table.table_name}"
    changeset, batch = f"changeset_{uuid.uuid4()}", f"batch_{uuid.uuid4()}"
    parts = [_encode(base, index, op) for index, op in enumerate(operations)]
    changes = "".join(f"--{changeset}\r\n{part}" for part in parts) + f"--{changeset}--\r\n"
    body = (
        f"--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n{changes}--{batch}--\r\n"
    ).encode()
    request = HttpRequest(
        "POST",
        f"{account_url}/$batch",
        headers={
            "Content-Type": f"multipart/mixed; boundary={batch}",
            "Accept": "application/json",
            "DataServiceVersion": "3.0",
            "MaxDataServiceVersion": "3.0;NetFx",
            "x-ms-version": table.api_version,
        },
        content=body,
    )
    # The client's own pipeline: authentication, retries, request accounting.
    response = await table._client.send_request(request, stream=True)
    text = (await response.read()).decode("utf-8", errors="replace")
    if response.status_code != 202:
        raise HttpResponseError(message=f"table transaction failed: {response.status_code} {text[:500]}")
    statuses = [int(code) for code in _STATUS.findall(text)]
    failed = next((code for code in statuses if not 200 <= code < 300), None)
    if failed in (404, 409, 412):
        raise BatchConflict(text[:500])
    if failed is not None or len(statuses) != len(operations):
        raise HttpResponseError(message=f"table transaction failed: {text[:500]}")
    return [etag.strip() for etag in _ETAG.findall(text)]


def _encode(base: str, index: int, op: BatchOperation) -> str:
    entity = _add_entity_properties(op.entity)
    payload = json.dumps(entity, separators=(",", ":"))
    if op.kind == "create":
        method, url, extra = "POST", f"{base}", "Prefer: return-no-content\r\n"
    else:
        keys = (
            f"(PartitionKey='{quote(_prepare_key(op.entity['PartitionKey']), safe='')}',"
            f"RowKey='{quote(_prepare_key(op.entity['RowKey']), safe='')}')"
        )
        method, url = "PUT", f"{base}{keys}"
        extra = f"If-Match: {op.etag}\r\n" if op.kind == "replace" else ""
    return (
        f"Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: {index}\r\n\r\n"
        f"{method} {url} HTTP/1.1\r\n"
        "Content-Type: application/json\r\nAccept: application/json;odata=minimalmetadata\r\n"
        f"Content-Length: {len(payload.encode())}\r\nDataServiceVersion: 3.0\r\n{extra}\r\n{payload}\r\n"
    )
