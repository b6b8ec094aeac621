import asyncio, time, collections, statistics, sys
from benchmarks import run as bench
from storage.azure import AzureStorageBackend
lat = collections.defaultdict(list)
def wrap(name):
    orig = getattr(AzureStorageBackend, name)
    async def w(self, *a, **k):
        t = time.perf_counter()
        try:
            return await orig(self, *a, **k)
        finally:
            lat[name].append((time.perf_counter() - t) * 1000)
    setattr(AzureStorageBackend, name, w)
for n in ["commit", "send_held", "send", "write_instance", "update_instance", "delete", "load_history", "read_instance", "receive"]:
    wrap(n)
from durable.host._azurite import Azurite
with Azurite() as az:
    asyncio.run(bench.run(az.connection_string, ["inproc"], [sys.argv[1]], 0))
for k, v in lat.items():
    v=sorted(v); print(k, len(v), "mean %.1f p50 %.1f p90 %.1f p99 %.1f max %.1f >50ms %d" % (statistics.mean(v), v[len(v)//2], v[int(len(v)*0.9)], v[int(len(v)*0.99)], v[-1], sum(x>50 for x in v)))
