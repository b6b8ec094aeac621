"""Azure Storage backend: the task hub on Tables, Queues and Blobs (DESIGN §5)."""

from ._accounting import StorageRequestCounter
from ._backend import AzureStorageBackend

__all__ = ["AzureStorageBackend", "StorageRequestCounter"]
