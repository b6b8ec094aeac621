"""`durable start` serves an app folder: HTTP starter → orchestration → status over HTTP."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import aiohttp

from tests.fixtures_host import REPO_ROOT


async def test_root_app_runs_an_orchestration_started_over_http(serve_app, tmp_path: Path) -> None:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    shutil.copy(REPO_ROOT / "function_app.py", app_dir)
    host_json = (REPO_ROOT / "host.json").read_text().replace('"DurableHub"', '"SmokeHub"')
    (app_dir / "host.json").write_text(host_json)
    served = serve_app(app_dir)
    assert "http_start: [POST]" in served.output()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{served.base_url}/api/orchestrators/hello_sequence") as response:
            assert response.status == 202
            payload = await response.json()
            assert response.headers["Location"] == payload["statusQueryGetUri"]
        deadline = time.monotonic() + 30
        while True:
            async with http.get(payload["statusQueryGetUri"]) as response:
                status = await response.json()
            if status["runtimeStatus"] == "Completed" or time.monotonic() > deadline:
                break
            assert response.status == 202
        assert response.status == 200
        assert status["output"] == ["Hello Tokyo!", "Hello Seattle!", "Hello London!"]
