"""The host side: the app objects and the Azure Functions adapter, the management HTTP API, the
local development host, its settings, the Azurite helper and the CLI. Imports runtime and core,
and chooses the storage backend (``storage``)."""
