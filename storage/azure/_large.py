"""Large payloads: queue messages and table properties too big for their service go to blobs.

All of an instance's blobs live under ``{escaped instance id}/``, so purging an instance deletes
them by prefix. Every blob has exactly one owner, and its owner deletes it:

- a queue message's blob (``{prefix}/message-{uuid}``) is deleted when the message is deleted
  through the backend (``delete``, ``poison``); the Functions host deletes the messages it
  delivers itself, so those blobs stay until the instance is purged;
- a history row's blob (``{prefix}/{RowKey}-{column}-{uuid}``) is deleted with its row, when a
  rewrite (continue-as-new, rewind, an entity step) moves the history past it;
- an Instances row's blob (``{prefix}/instance-{column}-{content hash}-{uuid}``) is deleted by the
  write that replaces the row, unless the new row keeps it (same content in the same column).

Names are unique per upload, never reused for other content: a blob is uploaded before the row
or message that points at it, and that write is conditional, so a write that loses its condition
must not have overwritten a blob the winning row points at (a deterministic per-column name
would). A losing write deletes what it uploaded. What a crash strands between an upload and its
row write, or between a row write and the deletion of the blobs it replaced, stays until purge.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob.aio import ContainerClient

# A queue message is at most 64 KiB; leave room for the XML envelope and escaping.
MAX_QUEUE_MESSAGE_BYTES = 45 * 1024
# A table string property is at most 64 KiB of UTF-16.
MAX_TABLE_PROPERTY_BYTES = 60 * 1024
BLOB_NAME_SUFFIX = "BlobName"
LARGE_MESSAGE_KEY = "$LargeMessageBlob"
INSTANCE_BLOB_LABEL = "instance"
_KEYS = frozenset({"PartitionKey", "RowKey"})


def message_too_large(content: str) -> bool:
    """Whether the queue content (as sent, XML-escaped by the SDK) exceeds the inline budget."""
    size = len(content.encode("utf-8")) + 4 * content.count("&") + 3 * (content.count("<") + content.count(">"))
    return size > MAX_QUEUE_MESSAGE_BYTES


def property_too_large(value: str) -> bool:
    # Cheap test first: a string of n characters is at most 4n bytes of UTF-16.
    if len(value) * 4 <= MAX_TABLE_PROPERTY_BYTES:
        return False
    return len(value.encode("utf-16-le")) > MAX_TABLE_PROPERTY_BYTES


def message_reference(blob_name: str) -> str:
    return json.dumps({LARGE_MESSAGE_KEY: blob_name}, separators=(",", ":"))


def parse_message_reference(body: str) -> str | None:
    """The blob name if ``body`` is a large-message reference, else None."""
    if not body.startswith('{"' + LARGE_MESSAGE_KEY):
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    name = data.get(LARGE_MESSAGE_KEY) if isinstance(data, dict) else None
    return name if isinstance(name, str) else None


def new_blob_name(prefix: str, label: str) -> str:
    return f"{prefix}/{label}-{uuid.uuid4().hex}"


def content_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


def instance_blob_name(prefix: str, column: str, digest: str) -> str:
    return f"{prefix}/{INSTANCE_BLOB_LABEL}-{column}-{digest}-{uuid.uuid4().hex[:12]}"


def _digest_of(name: str) -> str | None:
    """The content hash an Instances-row blob name carries (None for other names)."""
    parts = name.rsplit("/", 1)[-1].split("-")
    if len(parts) < 4 or parts[0] != INSTANCE_BLOB_LABEL:
        return None
    return parts[-2]


def blob_refs(entity: Mapping[str, Any]) -> dict[str, str]:
    """The blob-reference columns of a stored row: {column: blob name}."""
    return {
        column[: -len(BLOB_NAME_SUFFIX)]: value
        for column, value in entity.items()
        if column.endswith(BLOB_NAME_SUFFIX) and isinstance(value, str)
    }


class LargePayloadStore:
    def __init__(self, container: ContainerClient) -> None:
        self.container = container

    async def put(self, name: str, text: str) -> None:
        await self.container.upload_blob(name, text.encode("utf-8"), overwrite=True)

    async def get(self, name: str) -> str:
        downloader = await self.container.download_blob(name)
        data = await downloader.readall()
        return data.decode("utf-8")

    async def delete(self, names: Iterable[str]) -> None:
        """Delete these blobs; missing ones are fine."""

        async def delete_one(name: str) -> None:
            with contextlib.suppress(ResourceNotFoundError):
                await self.container.delete_blob(name)

        await asyncio.gather(*(delete_one(n) for n in set(names)))

    async def delete_quietly(self, names: Iterable[str]) -> None:
        """``delete``, for clean-up after the fact: a failure only leaves garbage (purge removes it)."""
        with contextlib.suppress(Exception):
            await self.delete(names)

    async def delete_prefix(self, prefix: str) -> int:
        names = [blob.name async for blob in self.container.list_blobs(name_starts_with=prefix)]
        await self.delete(names)
        return len(names)

    # -- table properties -------------------------------------------------------------------------
    def plan_offload(self, entity: dict[str, Any], prefix: str) -> list[tuple[str, str]]:
        """Replace oversized string properties of a history row by blob references, in place.

        Returns the (blob name, text) pairs that must be uploaded before the entity is written.
        """
        uploads: list[tuple[str, str]] = []
        for column in list(entity):
            value = entity[column]
            if column in _KEYS or not isinstance(value, str) or not property_too_large(value):
                continue
            name = new_blob_name(prefix, f"{entity.get('RowKey') or 'row'}-{column}")
            uploads.append((name, value))
            del entity[column]
            entity[column + BLOB_NAME_SUFFIX] = name
        return uploads

    def plan_instance_offload(
        self, entity: dict[str, Any], prefix: str, current: Mapping[str, str]
    ) -> list[tuple[str, str]]:
        """Like ``plan_offload`` for an Instances row; ``current``: the blob references of the
        row this write replaces ({column: name}). A column whose content is unchanged keeps its
        blob (no upload). Returns the uploads."""
        uploads: list[tuple[str, str]] = []
        for column in list(entity):
            value = entity[column]
            if column in _KEYS or not isinstance(value, str) or not property_too_large(value):
                continue
            digest = content_hash(value)
            name = current.get(column)
            if name is None or _digest_of(name) != digest:
                name = instance_blob_name(prefix, column, digest)
                uploads.append((name, value))
            del entity[column]
            entity[column + BLOB_NAME_SUFFIX] = name
        return uploads

    async def upload_all(self, uploads: Iterable[tuple[str, str]]) -> None:
        await asyncio.gather(*(self.put(name, text) for name, text in uploads))

    async def resolve(self, entities: Iterable[dict[str, Any]]) -> None:
        """Replace blob-reference columns by the blob contents, in place."""
        jobs: list[tuple[dict[str, Any], str, str]] = []
        for entity in entities:
            for column, value in list(entity.items()):
                if column.endswith(BLOB_NAME_SUFFIX) and isinstance(value, str):
                    jobs.append((entity, column, value))
        if not jobs:
            return
        texts = await asyncio.gather(*(self.get(name) for _, _, name in jobs))
        for (entity, column, _), text in zip(jobs, texts, strict=True):
            del entity[column]
            entity[column[: -len(BLOB_NAME_SUFFIX)]] = text
