"""Porting check: ``samples/ported_official`` is written for the official SDK (a ``df.Blueprint`` on a
plain ``func.FunctionApp``, ``function_name``, the ``build()`` unit-test pattern) with its import
changed to ``import durable as df``; it runs under ``durable start`` and unit-tests as documented."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from unittest.mock import AsyncMock, Mock

import aiohttp
import azure.functions as func

from samples.ported_official.orders import confirmation_text, order_total, order_workflow, place_order
from tests.fixtures_host import REPO_ROOT, ServedApp

PORTED_APP = REPO_ROOT / "samples" / "ported_official"
ORDER = {
    "id": "A1",
    "lines": [{"sku": "pen", "quantity": 3, "unit_price": 1.25}, {"sku": "pad", "quantity": 1, "unit_price": 2}],
}


def test_the_port_is_the_import_line() -> None:
    blueprint = (PORTED_APP / "orders.py").read_text()
    assert "import durable as df  # was: import azure.durable_functions as df" in blueprint
    app = (PORTED_APP / "function_app.py").read_text()
    assert "app = func.FunctionApp(" in app and "app.register_functions(bp)" in app
    assert "DFApp" not in app


def test_orchestrator_unit_test_pattern() -> None:
    # Microsoft's documented pattern: the generator function from build().get_user_function().
    code = order_workflow.build().get_user_function().orchestrator_function
    context = Mock()
    context.get_input = Mock(return_value=ORDER)
    context.call_activity = Mock(side_effect=lambda name, value: (name, value))
    steps = code(context)
    assert next(steps) == ("price_order", ORDER["lines"])
    assert steps.send(5.75) == ("confirm_order", {"id": "A1", "total": 5.75})
    try:
        steps.send("confirmed")
    except StopIteration as finished:
        assert finished.value == {"order": "A1", "total": 5.75, "confirmation": "confirmed"}
    else:
        raise AssertionError("the orchestrator did not finish")


def test_activity_and_client_unit_test_patterns() -> None:
    assert order_total.build().get_user_function()(ORDER["lines"]) == 5.75
    assert confirmation_text({"id": "A1", "total": 5.75}) == "order A1 confirmed, 5.75 to pay"
    # A client function as written: the test hands it the client it would get.
    code = place_order.build().get_user_function().client_function
    client = Mock()
    client.start_new = AsyncMock(return_value="instance-1")
    client.create_check_status_response = Mock(return_value="check-status")
    request = func.HttpRequest("POST", "/api/orders", body=b'{"id": "A1", "lines": []}')
    assert asyncio.run(code(request, client)) == "check-status"
    client.start_new.assert_awaited_once_with("process_order", client_input={"id": "A1", "lines": []})
    bad = func.HttpRequest("POST", "/api/orders", body=b"not json")
    assert asyncio.run(code(bad, client)).status_code == 400


async def test_ported_sample_runs(serve_app: Callable[..., ServedApp]) -> None:
    served = serve_app(PORTED_APP)
    assert "place_order: [POST]" in served.output()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{served.base_url}/api/orders", json=ORDER) as response:
            assert response.status == 202, await response.text()
            payload = await response.json()
        status = await _finished(http, payload["statusQueryGetUri"])
        async with http.post(f"{served.base_url}/api/orders", data="[1, 2") as response:
            assert response.status == 400
    assert status["runtimeStatus"] == "Completed", status
    assert status["name"] == "process_order"
    assert status["output"] == {"order": "A1", "total": 5.75, "confirmation": "order A1 confirmed, 5.75 to pay"}


async def _finished(http: aiohttp.ClientSession, status_uri: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        async with http.get(status_uri) as response:
            status: dict[str, Any] = await response.json()
        if status["runtimeStatus"] in ("Completed", "Failed", "Terminated"):
            return status
        assert time.monotonic() < deadline, f"not finished in 30 s: {status}"
        await asyncio.sleep(0.1)
