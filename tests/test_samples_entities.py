"""The entity samples, driven over HTTP through `durable start` on Azurite."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from tests.fixtures_host import REPO_ROOT

SAMPLES = REPO_ROOT / "samples"


async def _run(http: aiohttp.ClientSession, base: str, orchestrator: str, body: Any) -> Any:
    async with http.post(f"{base}/api/orchestrators/{orchestrator}", json=body) as response:
        assert response.status == 202
        status_url = (await response.json())["statusQueryGetUri"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        async with http.get(status_url) as response:
            status = await response.json()
        if status["runtimeStatus"] in ("Completed", "Failed", "Terminated"):
            assert status["runtimeStatus"] == "Completed", status
            return status["output"]
        await asyncio.sleep(0.1)
    raise AssertionError(f"{orchestrator} did not finish: {status}")


async def test_counter_entity_over_http(serve_app) -> None:
    served = serve_app(SAMPLES / "counter_entity")
    base = served.base_url
    async with aiohttp.ClientSession() as http:
        adds = [http.post(f"{base}/api/counters/c1/add", json=n) for n in range(1, 21)]
        for response in await asyncio.gather(*adds):
            assert response.status == 202
            response.release()
        async with http.post(f"{base}/api/counters/c1/add", json="ten") as response:
            assert response.status == 400
        # A burst from one orchestration: its `get` is answered after its 50 additions.
        assert await _run(http, base, "counter_burst", {"key": "c2", "times": 50}) == 50
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            async with http.get(f"{base}/api/counters/c1") as response:
                state = await response.json()
            if state["value"] == sum(range(1, 21)):
                break
            await asyncio.sleep(0.1)
        assert state == {"key": "c1", "exists": True, "value": 210}
        async with http.post(f"{base}/api/counters/c1/reset") as response:
            assert response.status == 202
        async with http.get(f"{base}/api/durabletask/entities/counter/c2") as response:
            assert await response.json() == 50


async def test_concurrent_transfers_never_overdraw(serve_app) -> None:
    served = serve_app(SAMPLES / "bank_transfer")
    base = served.base_url
    async with aiohttp.ClientSession() as http:
        assert await _run(http, base, "bank_deposit", {"account": "alice", "amount": 100}) == 100
        # Seven transfers of 20 race for alice's 100: exactly five can succeed.
        transfers = [
            _run(http, base, "bank_transfer", {"from": "alice", "to": f"payee{i % 2}", "amount": 20}) for i in range(7)
        ]
        results = await asyncio.gather(*transfers)
        assert sum(1 for r in results if r["transferred"]) == 5
        balances = {}
        for account in ("alice", "payee0", "payee1"):
            async with http.get(f"{base}/api/durabletask/entities/account/{account}") as response:
                balances[account] = (await response.json())["balance"]
        assert balances["alice"] == 0
        assert balances["payee0"] + balances["payee1"] == 100
