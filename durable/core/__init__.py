"""The pure core: history and messages, the orchestration context and tasks, entities, the replay
executor and the instance protocol (``_protocol``). No I/O and no asyncio here; everything above
(runtime, host, storage) is written against these modules, and they import nothing from above."""
