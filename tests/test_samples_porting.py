"""Porting check: Microsoft's Durable Functions Python (v2 model) quickstart app, with only its
import line changed to ``import durable as df``, runs under ``durable start``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp

from tests.fixtures_host import REPO_ROOT, ServedApp

PORTED_APP = REPO_ROOT / "samples" / "ported_official"


def test_only_the_import_line_differs_from_the_official_sample() -> None:
    lines = (PORTED_APP / "function_app.py").read_text().splitlines()
    assert lines[:2] == ["import azure.functions as func", "import durable as df"]
    assert "azure.durable_functions" not in "\n".join(lines)
    assert "myApp = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)" in lines


async def test_ported_official_sample_runs(serve_app: Callable[..., ServedApp]) -> None:
    served = serve_app(PORTED_APP)
    assert "http_start: [" in served.output()
    async with aiohttp.ClientSession() as http:
        # The official starter takes any method and starts the orchestrator without input.
        async with http.post(f"{served.base_url}/api/orchestrators/hello_orchestrator") as response:
            assert response.status == 202, await response.text()
            payload = await response.json()
            assert response.headers["Location"] == payload["statusQueryGetUri"]
        deadline = time.monotonic() + 30
        while True:
            async with http.get(payload["statusQueryGetUri"]) as response:
                status = await response.json()
            if status["runtimeStatus"] in ("Completed", "Failed", "Terminated"):
                break
            assert response.status == 202
            assert time.monotonic() < deadline, f"not finished in 30 s: {status}"
            await asyncio.sleep(0.1)
    assert response.status == 200
    assert status["runtimeStatus"] == "Completed", status
    assert status["name"] == "hello_orchestrator"
    # The sample greets Seattle, then Tokyo, then London.
    assert status["output"] == ["Hello Seattle", "Hello Tokyo", "Hello London"]
