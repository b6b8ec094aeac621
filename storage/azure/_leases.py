"""Partition leases on Azure Storage: one blob per control queue in ``{hub}-leases``, leased by
the host that takes that queue's messages (``durable.runtime._ownership``).

The lease id is the owner's id (a GUID), so renewing and releasing need nothing but it; the
owner is also written to the blob's metadata, so that one listing tells every host who holds
what (a listing shows lease states and metadata, never lease ids).
"""

from __future__ import annotations

import contextlib

from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob.aio import BlobClient, BlobLeaseClient, ContainerClient

_PREFIX = "partition-"
_OWNER = "owner"


def _blob_name(partition: int) -> str:
    return f"{_PREFIX}{partition:02d}"


class PartitionLeaseStore:
    def __init__(self, container: ContainerClient) -> None:
        self.container = container

    async def acquire(self, partition: int, owner: str, seconds: float, *, steal: bool = False) -> bool:
        blob = self.container.get_blob_client(_blob_name(partition))
        try:
            await _acquire(blob, owner, seconds)
        except HttpResponseError as exc:
            if not _lease_present(exc):
                raise
            if not steal:
                return False
            await BlobLeaseClient(blob, lease_id=owner).break_lease(lease_break_period=0)
            try:
                await _acquire(blob, owner, seconds)
            except HttpResponseError as again:
                if _lease_present(again):
                    return False  # another host stole it first
                raise
        await blob.set_blob_metadata({_OWNER: owner}, lease=owner)
        return True

    async def renew(self, partition: int, owner: str) -> bool:
        lease = BlobLeaseClient(self.container.get_blob_client(_blob_name(partition)), lease_id=owner)
        try:
            await lease.renew()
        except HttpResponseError as exc:
            if isinstance(exc, ResourceNotFoundError) or exc.status_code in (409, 412):
                return False  # expired and taken, stolen, or the hub is gone
            raise
        return True

    async def release(self, partition: int, owner: str) -> None:
        lease = BlobLeaseClient(self.container.get_blob_client(_blob_name(partition)), lease_id=owner)
        with contextlib.suppress(ResourceNotFoundError, ResourceExistsError, HttpResponseError):
            await lease.release()  # lost already: nothing to give back

    async def owners(self) -> dict[int, str]:
        held: dict[int, str] = {}
        async for blob in self.container.list_blobs(name_starts_with=_PREFIX, include=["metadata"]):
            owner = (blob.metadata or {}).get(_OWNER)
            if blob.lease.state == "leased" and owner:
                with contextlib.suppress(ValueError):
                    held[int(blob.name[len(_PREFIX) :])] = owner
        return held


async def _acquire(blob: BlobClient, owner: str, seconds: float) -> None:
    try:
        await blob.acquire_lease(lease_duration=round(seconds), lease_id=owner)
    except ResourceNotFoundError:  # the first lease of this partition: make its blob
        with contextlib.suppress(ResourceExistsError):
            await blob.upload_blob(b"", overwrite=False)
        await blob.acquire_lease(lease_duration=round(seconds), lease_id=owner)


def _lease_present(exc: HttpResponseError) -> bool:
    """Another owner holds the lease."""
    return getattr(exc, "error_code", None) == "LeaseAlreadyPresent"
