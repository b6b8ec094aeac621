"""Large payloads: queue messages and table properties too big for their service go to blobs.

Blobs are always written before the row or message that points at them, under names that are
unique per write (a failed commit never overwrites a blob a committed row still references), and
grouped under ``{escaped instance id}/`` so purging an instance can delete them by prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterable
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob.aio import ContainerClient

# A queue message is at most 64 KiB; leave room for the XML envelope and escaping.
MAX_QUEUE_MESSAGE_BYTES = 45 * 1024
# A table string property is at most 64 KiB of UTF-16.
MAX_TABLE_PROPERTY_BYTES = 60 * 1024
BLOB_NAME_SUFFIX = "BlobName"
LARGE_MESSAGE_KEY = "$LargeMessageBlob"
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


class LargePayloadStore:
    def __init__(self, container: ContainerClient) -> None:
        self.container = container

    async def put(self, name: str, text: str) -> None:
        await self.container.upload_blob(name, text.encode("utf-8"), overwrite=True)

    async def get(self, name: str) -> str:
        downloader = await self.container.download_blob(name)
        data = await downloader.readall()
        return data.decode("utf-8")

    async def delete_prefix(self, prefix: str) -> int:
        names = [blob.name async for blob in self.container.list_blobs(name_starts_with=prefix)]

        async def delete(name: str) -> None:
            with contextlib.suppress(ResourceNotFoundError):
                await self.container.delete_blob(name)

        await asyncio.gather(*(delete(n) for n in names))
        return len(names)

    # -- table properties -------------------------------------------------------------------------
    def plan_offload(self, entity: dict[str, Any], prefix: str) -> list[tuple[str, str]]:
        """Replace oversized string properties of ``entity`` by blob references, in place.

        Returns the (blob name, text) pairs that must be uploaded before the entity is written.
        """
        uploads: list[tuple[str, str]] = []
        for column in list(entity):
            value = entity[column]
            if column in _KEYS or not isinstance(value, str) or not property_too_large(value):
                continue
            name = new_blob_name(prefix, f"{entity.get('RowKey') or 'instance'}-{column}")
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
