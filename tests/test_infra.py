"""The deployment template (infra/main.bicep), parsed with a Bicep parser: what it creates, the app
settings the Functions host and this runtime read, its parameters, and that storage is reached
with the app's managed identity only (no account key anywhere).

The parser (pycep) renders an identifier as its bare name and a property path ``a.b.c`` as nested
``property_accessor`` operators; ``accessor`` below builds the latter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pycep import BicepParser

from durable.host._client_binding import MANAGEMENT_KEY_SETTING
from durable.host._settings import HostSettings, resolve_identity_connection

INFRA = Path(__file__).resolve().parent.parent / "infra"
TEMPLATE = INFRA / "main.bicep"

ROLE_BLOB_DATA_OWNER = "b7e6dc6d-f1e8-4753-8033-0f276bb0955b"
ROLE_QUEUE_DATA_CONTRIBUTOR = "974c5e8b-45b9-4653-ba55-5f855dd0d86a"
ROLE_TABLE_DATA_CONTRIBUTOR = "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3"
# Settings a Flex Consumption app refuses: functionAppConfig holds what they used to say.
FLEX_REJECTED_SETTINGS = {
    "FUNCTIONS_EXTENSION_VERSION",
    "FUNCTIONS_WORKER_RUNTIME",
    "FUNCTIONS_WORKER_RUNTIME_VERSION",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    "WEBSITE_CONTENTSHARE",
    "WEBSITE_RUN_FROM_PACKAGE",
    "SCM_DO_BUILD_DURING_DEPLOYMENT",
    "ENABLE_ORYX_BUILD",
}
HUB_SETTING = "AzureFunctionsJobHost__extensions__durableTask__hubName"


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return BicepParser().parse(file_path=TEMPLATE)  # type: ignore[return-value]


def accessor(*path: str) -> Any:
    """The parsed form of the Bicep expression ``path[0].path[1]...``."""
    if len(path) == 1:
        return path[0]
    operands = {"operand_1": path[0], "operand_2": accessor(*path[1:])}
    return {"operator": {"type": "property_accessor", "operands": operands}}


def resource(template: dict[str, Any], resource_type: str) -> dict[str, Any]:
    found = [r for r in template["resources"].values() if r["type"] == resource_type]
    assert len(found) == 1, f"expected one {resource_type}, found {len(found)}"
    return found[0]["config"]  # type: ignore[no-any-return]


def settings(template: dict[str, Any], variable: str) -> dict[str, Any]:
    entries = template["variables"][variable]["value"]
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), f"{variable} names a setting twice"
    return {entry["name"]: entry["value"] for entry in entries}


def allowed(template: dict[str, Any], parameter: str) -> list[Any]:
    decorators = template["parameters"][parameter]["decorators"]
    return next(d["argument"] for d in decorators if d["type"] == "allowed")


def walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def test_template_creates_the_app_its_storage_identity_and_monitoring(template: dict[str, Any]) -> None:
    types = {r["type"] for r in template["resources"].values()}
    assert types == {
        "Microsoft.ManagedIdentity/userAssignedIdentities",
        "Microsoft.Storage/storageAccounts",
        "Microsoft.Storage/storageAccounts/blobServices",
        "Microsoft.Storage/storageAccounts/blobServices/containers",
        "Microsoft.Authorization/roleAssignments",
        "Microsoft.OperationalInsights/workspaces",
        "Microsoft.Insights/components",
        "Microsoft.Web/serverfarms",
        "Microsoft.Web/sites",
    }
    app = resource(template, "Microsoft.Web/sites")
    assert app["kind"] == "functionapp,linux"
    assert app["identity"] == {"type": "UserAssigned", "userAssignedIdentities": {"'${identity.id}'": {}}}


def test_storage_refuses_shared_keys_and_no_key_is_read(template: dict[str, Any]) -> None:
    storage = resource(template, "Microsoft.Storage/storageAccounts")["properties"]
    assert storage["allowSharedKeyAccess"] is False
    assert storage["allowBlobPublicAccess"] is False
    # Neither listKeys/listAccountSas/... (as a function or a resource method) nor a key in a string.
    list_calls = [
        node
        for node in walk(template)
        if isinstance(node, dict) and str(node.get("func_name", "")).lower().startswith("list")
    ]
    assert list_calls == []
    text = TEMPLATE.read_text(encoding="utf-8")
    assert re.search(r"\blist\w*\(", text, re.IGNORECASE) is None
    assert re.search(r"AccountKey|SharedAccessSignature|WEBSITE_CONTENTAZUREFILECONNECTIONSTRING", text) is None


def test_app_reaches_storage_with_its_managed_identity(template: dict[str, Any]) -> None:
    common = settings(template, "commonAppSettings")
    assert common["AzureWebJobsStorage__accountName"] == accessor("storage", "name")
    assert common["AzureWebJobsStorage__credential"] == "managedidentity"
    assert common["AzureWebJobsStorage__clientId"] == accessor("identity", "properties", "clientId")
    assert "AzureWebJobsStorage" not in common  # a connection string would carry a key

    assert template["variables"]["storageRoleIds"]["value"] == [
        ROLE_BLOB_DATA_OWNER,
        ROLE_QUEUE_DATA_CONTRIBUTOR,
        ROLE_TABLE_DATA_CONTRIBUTOR,
    ]
    grants = template["resources"]["appRoles"]["config"]
    assert grants["loop_type"]["detail"] == {"item_name": "roleId", "array_name": "storageRoleIds"}
    grant = grants["config"]
    assert grant["scope"] == "storage"
    assert grant["properties"]["principalId"] == accessor("identity", "properties", "principalId")
    assert grant["properties"]["roleDefinitionId"]["function"]["parameters"]["resource_name_1"] == "roleId"
    # The host starts with the app and needs its roles from the first start.
    assert "appRoles" in resource(template, "Microsoft.Web/sites")["dependsOn"]


def test_the_runtime_reads_the_identity_settings_the_template_writes(
    template: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    common = settings(template, "commonAppSettings")
    deployed = {"accountName": "stdurable", "clientId": "6e2b1c2a-0000-4000-8000-000000000001"}
    for name, value in common.items():
        if name.startswith("AzureWebJobsStorage__"):
            key = name.removeprefix("AzureWebJobsStorage__")
            monkeypatch.setenv(name, value if isinstance(value, str) and key not in deployed else deployed[key])
    connection = resolve_identity_connection(HostSettings.load(INFRA.parent).connection_setting)
    assert connection is not None
    assert (connection.blob_uri, connection.queue_uri, connection.table_uri) == (
        "https://stdurable.blob.core.windows.net",
        "https://stdurable.queue.core.windows.net",
        "https://stdurable.table.core.windows.net",
    )
    assert connection.managed_identity
    assert connection.client_id == deployed["clientId"]


def test_application_insights_is_workspace_based_and_wired_to_the_app(template: dict[str, Any]) -> None:
    insights = resource(template, "Microsoft.Insights/components")["properties"]
    assert insights["WorkspaceResourceId"] == accessor("workspace", "id")
    common = settings(template, "commonAppSettings")
    assert common["APPLICATIONINSIGHTS_CONNECTION_STRING"] == accessor("appInsights", "properties", "ConnectionString")


def test_python_versions_and_hosting_plans(template: dict[str, Any]) -> None:
    assert allowed(template, "pythonVersion") == ["3.10", "3.11", "3.12", "3.13"]
    assert template["parameters"]["pythonVersion"]["default"] in {"3.12", "3.13"}
    assert set(allowed(template, "hostingPlan")) == {"FlexConsumption", "Consumption", "Premium"}
    assert template["parameters"]["hostingPlan"]["default"] == "FlexConsumption"
    skus = template["variables"]["planSkus"]["value"]
    assert skus == {
        "FlexConsumption": {"name": "FC1", "tier": "FlexConsumption"},
        "Consumption": {"name": "Y1", "tier": "Dynamic"},
        "Premium": {"name": "EP1", "tier": "ElasticPremium"},
    }
    plan = resource(template, "Microsoft.Web/serverfarms")
    index = {"operand_1": "planSkus", "operand_2": "hostingPlan"}
    assert plan["sku"] == {"operator": {"type": "index_accessor", "operands": index}}


def test_flex_consumption_app_config(template: dict[str, Any]) -> None:
    config = template["variables"]["flexAppConfig"]["value"]
    storage = config["deployment"]["storage"]
    assert storage["type"] == "blobContainer"
    assert storage["authentication"] == {
        "type": "UserAssignedIdentity",
        "userAssignedIdentityResourceId": accessor("identity", "id"),
    }
    assert config["runtime"] == {"name": "python", "version": "pythonVersion"}
    assert set(config["scaleAndConcurrency"]) == {"maximumInstanceCount", "instanceMemoryMB"}
    # The site gets functionAppConfig on Flex Consumption only, and only the settings Flex accepts.
    site = resource(template, "Microsoft.Web/sites")["properties"]["function"]
    assert site["type"] == "union"
    on_flex = site["parameters"]["arg_2"]["operator"]["operands"]
    assert (on_flex["condition"], on_flex["true_value"], on_flex["false_value"]) == (
        "isFlex",
        {"functionAppConfig": "flexAppConfig"},
        {},
    )
    app_settings = template["variables"]["baseSiteConfig"]["value"]["appSettings"]["operator"]["operands"]
    assert app_settings["condition"] == "isFlex"
    assert app_settings["true_value"] == "commonAppSettings"
    assert FLEX_REJECTED_SETTINGS.isdisjoint(settings(template, "commonAppSettings"))
    classic = settings(template, "classicAppSettings")
    assert (classic["FUNCTIONS_WORKER_RUNTIME"], classic["FUNCTIONS_EXTENSION_VERSION"]) == ("python", "~4")
    # The other plans run from the package blob, fetched with the identity (no content share).
    assert classic["WEBSITE_RUN_FROM_PACKAGE"] == "packageBlobUrl"
    assert classic["WEBSITE_RUN_FROM_PACKAGE_BLOB_MI_RESOURCE_ID"] == accessor("identity", "id")


def test_task_hub_parameter_reaches_the_runtime(template: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    common = settings(template, "commonAppSettings")
    assert common[HUB_SETTING] == "taskHubName"
    # The app setting the template writes is the one the runtime reads (the repository's own
    # host.json names a fixed hub, which the setting overrides as the Functions host would).
    monkeypatch.setenv(HUB_SETTING, "DeployedHub")
    assert HostSettings.load(INFRA.parent).hub_name == "DeployedHub", (
        f"the runtime ignores the {HUB_SETTING} app setting that infra/main.bicep writes"
    )


def test_management_key_is_set_up_in_the_same_deployment(template: dict[str, Any]) -> None:
    parameter = template["parameters"]["managementKey"]
    assert {"type": "secure"} in parameter["decorators"]
    # A fresh random key unless one is given, so no second deployment is needed to add one.
    assert parameter["default"]["function"]["type"] == "replace"
    assert "newGuid()" in parameter["default"]["function"]["parameters"]["original_string"]
    assert settings(template, "commonAppSettings")[MANAGEMENT_KEY_SETTING] == "managementKey"


def test_example_parameters_fit_the_template(template: dict[str, Any]) -> None:
    values = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
    for name, entry in values.items():
        assert name in template["parameters"], f"main.parameters.json sets unknown parameter {name}"
        choices = [d["argument"] for d in template["parameters"][name]["decorators"] if d["type"] == "allowed"]
        if choices:
            assert entry["value"] in choices[0], f"{name}={entry['value']!r} is not allowed"
