"""The app as the Functions host sees it: indexed by the Python worker library itself
(``azure-functions-runtime``, the worker Python 3.13 apps run on), through the worker's own
start-up and metadata handlers, for the root ``function_app.py`` and a sample.

The worker library needs Python 3.13. When this interpreter has it, it is used directly;
otherwise the test runs it from ``.venv/matrix/py3.13-af2`` (built by ``.ci/matrix``) or from
the interpreter named by ``DURABLE_WORKER_PYTHON``.

The host receives each function's bindings as function.json-style JSON (``raw_bindings``) plus a
name → direction map. The host's gRPC message types are plain records here: the worker only
constructs them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER_ENV = ROOT / ".venv" / "matrix" / "py3.13-af2"
APPS = {"root": ROOT, "counter_entity": ROOT / "samples" / "counter_entity"}

# Runs in the worker's interpreter: the worker's init request (which indexes the app folder) and
# its metadata request, answered as they would be to the host. Prints one JSON line.
WORKER_INDEX = r"""
import asyncio, json, sys
from types import SimpleNamespace

from azure_functions_runtime import handle_event

app_dir = sys.argv[1]
sys.path.insert(0, app_dir)  # the worker imports function_app from the script root


class Record:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def message(name, **constants):
    return type(name, (Record,), constants)


# Enum values of the Functions RPC protocol (BindingInfo.Direction/DataType, StatusResult.Status).
BindingInfo = message("BindingInfo", out=1, inout=2, undefined=0, string=1, binary=2, stream=3)
setattr(BindingInfo, "in", 0)
protos = SimpleNamespace(
    BindingInfo=BindingInfo,
    StatusResult=message("StatusResult", Failure=0, Success=1, Cancelled=2),
    **{name: message(name) for name in (
        "RpcFunctionMetadata", "RpcRetryOptions", "WorkerInitResponse", "WorkerMetadata",
        "FunctionMetadataResponse", "RpcException")},
)
init = SimpleNamespace(capabilities={}, function_app_directory=app_dir)
request = SimpleNamespace(
    request=SimpleNamespace(worker_init_request=init), properties={"protos": protos, "host": "127.0.0.1"}
)
started = asyncio.run(handle_event.worker_init_request(request))
if started.result.status != protos.StatusResult.Success:
    sys.exit("the worker failed to index the app: " + started.result.exception.message)
answer = asyncio.run(handle_event.functions_metadata_request(request))
import azure.functions
functions = [
    {
        "name": metadata.name,
        "bindings": [json.loads(raw) for raw in metadata.raw_bindings],
        "directions": {name: info.direction for name, info in metadata.bindings.items()},
    }
    for metadata in answer.function_metadata_results
]
print(json.dumps({"python": list(sys.version_info[:2]), "azure_functions": azure.functions.__version__,
                  "functions": functions}))
"""

# Runs in this interpreter: the same folder as the local host (durable start) indexes it, the
# settings the runtime reads and the durable functions the app registered.
LOCAL_INDEX = r"""
import json, sys
from pathlib import Path

from durable.host._host import load_function_app
from durable.host._settings import HostSettings

app_dir = Path(sys.argv[1])
app = load_function_app(app_dir)
settings = HostSettings.load(app_dir)
registry = app.durable_functions
print(json.dumps({
    "functions": [
        {"name": f.get_function_name(), "bindings": [json.loads(raw) for raw in f.get_raw_bindings()]}
        for f in app.get_functions()
    ],
    "hub": settings.hub_name,
    "partitions": settings.partition_count,
    "connection": settings.connection_setting,
    "durable": sorted([*registry.orchestrators, *registry.activities, *registry.entities]),
}))
"""

# Binding types of the Durable extension: if the host saw one, it would load the extension, which
# would compete with this runtime for the same <hub>-control-NN and <hub>-workitems queues.
DURABLE_EXTENSION_TYPES = {"orchestrationTrigger", "activityTrigger", "entityTrigger", "durableClient"}


def worker_python() -> str:
    if importlib.util.find_spec("azure_functions_runtime") is not None:
        return sys.executable
    named = os.environ.get("DURABLE_WORKER_PYTHON")
    if named:
        return named
    candidate = WORKER_ENV / "bin" / "python"
    if candidate.exists():
        return str(candidate)
    pytest.fail(
        "tests/test_indexing.py needs the Python worker library (azure-functions-runtime, Python 3.13): "
        f"run `.ci/matrix py3.13-af2` to build {WORKER_ENV.relative_to(ROOT)}, or set DURABLE_WORKER_PYTHON "
        "to a Python 3.13 with this project's dependencies and azure-functions-runtime"
    )


def run_index(python: str, script: str, app_dir: Path) -> dict[str, Any]:
    # Only the settings the app folder itself implies: no host.json overrides from this process.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AzureFunctionsJobHost__")}
    env.update(PYTHONPATH=str(ROOT), AzureWebJobsScriptRoot=str(app_dir))
    done = subprocess.run(
        [python, "-c", script, str(app_dir)], cwd=app_dir, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"indexing {app_dir} failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module", params=sorted(APPS))
def indexed(request: pytest.FixtureRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    app_dir = APPS[request.param]
    return run_index(worker_python(), WORKER_INDEX, app_dir), run_index(sys.executable, LOCAL_INDEX, app_dir)


def by_name(functions: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {f["name"]: f["bindings"] for f in functions}


def test_the_worker_indexes_what_the_local_host_serves(indexed: tuple[dict[str, Any], dict[str, Any]]) -> None:
    worker, local = indexed
    assert worker["python"] >= [3, 13]
    assert by_name(worker["functions"]) == by_name(local["functions"])


def test_the_task_hub_queues_have_queue_triggers(indexed: tuple[dict[str, Any], dict[str, Any]]) -> None:
    worker, local = indexed
    functions = by_name(worker["functions"])
    queues = [f"control-{p:02d}" for p in range(local["partitions"])] + ["workitems"]
    for queue in queues:
        assert functions[f"durable_{queue.replace('-', '_')}"] == [
            {
                "direction": "IN",
                "type": "queueTrigger",
                "name": "msg",
                "queueName": f"{local['hub'].lower()}-{queue}",
                "connection": local["connection"],
            }
        ]


def test_the_management_api_and_the_starter_have_http_triggers(indexed: tuple[dict[str, Any], dict[str, Any]]) -> None:
    functions = by_name(indexed[0]["functions"])
    http_out = {"direction": "OUT", "type": "http", "name": "$return"}
    shown = ("direction", "type", "route", "methods")
    management_trigger, management_out = functions["durable_management"]
    assert {k: management_trigger[k] for k in shown} == {
        "direction": "IN",
        "type": "httpTrigger",
        "route": "durabletask/{*path}",
        "methods": ["GET", "POST", "DELETE"],
    }
    assert management_out == http_out
    starter_trigger, starter_out = functions["http_start"]
    assert {k: starter_trigger[k] for k in shown} == {
        "direction": "IN",
        "type": "httpTrigger",
        "route": "orchestrators/{functionName}",
        "methods": ["POST"],
    }
    assert starter_out == http_out


def test_durable_functions_reach_the_host_only_through_the_runtime(
    indexed: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    worker, local = indexed
    assert local["durable"], "the app registered no orchestrator, activity or entity"
    for function in worker["functions"]:
        types = {binding["type"] for binding in function["bindings"]}
        assert not types & DURABLE_EXTENSION_TYPES, f"{function['name']} would load the Durable extension"
        assert function["name"] not in local["durable"]
        # Directions as the host receives them: triggers in, the HTTP answer out.
        expected = {b["name"]: 0 if b["direction"] == "IN" else 1 for b in function["bindings"]}
        assert function["directions"] == expected
