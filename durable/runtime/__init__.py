"""The runtime: the I/O shell around the core (the worker's receive → load → plan → step →
commit → send → project → ack), the storage interface backends implement (``_backend``), the
client, the in-process runtime and the Replayer. Imports the core, never the host or storage."""
