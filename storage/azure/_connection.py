"""Connection strings: Azurite's well-known development account, and what
``UseDevelopmentStorage=true`` stands for."""

from __future__ import annotations

# Azurite's well-known development account (the same in every installation; not a secret).
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
DEFAULT_PORTS = (10000, 10001, 10002)  # blob, queue, table: what UseDevelopmentStorage=true means


def connection_string(blob_port: int, queue_port: int, table_port: int, host: str = "127.0.0.1") -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
        f"BlobEndpoint=http://{host}:{blob_port}/{DEV_ACCOUNT};"
        f"QueueEndpoint=http://{host}:{queue_port}/{DEV_ACCOUNT};"
        f"TableEndpoint=http://{host}:{table_port}/{DEV_ACCOUNT};"
    )


def resolve_connection_string(value: str) -> str:
    """``UseDevelopmentStorage=true`` → the explicit Azurite connection string on default ports."""
    if value.replace(" ", "").lower() == "usedevelopmentstorage=true":
        return connection_string(*DEFAULT_PORTS)
    return value
