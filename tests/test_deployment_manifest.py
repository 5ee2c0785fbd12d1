"""The IoT Edge deployment manifest: valid by the published IoT Edge schemas, refused by our validator
with the path of each problem, content addressed, and read back for the model it names.

The published JSON schemas of the edgeAgent and edgeHub desired properties (from the Azure IoT
CLI extension) are read from `../shared/schemas/iotedge` beside the repository, or the folder
IOTEDGE_SCHEMAS_DIR names; without them these tests fail, never skip.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from iothub_standin import DEFAULT_SCHEMAS_DIR, REPO_ROOT, SCHEMAS_DIR_ENV, load_schemas

from turbofan_core import deployment_manifest as dm
from turbofan_core.deployment_manifest import ManifestError, ManifestSettings
from turbofan_core.storage import LocalStore

MODEL = {"version": "7", "uri": "/var/lib/models/bundle.zip", "sha256": "ab" * 32}
DESIRED = "properties.desired"


@functools.cache
def published_schemas() -> dict[str, dict[str, Any]]:
    """A validator of each published schema, by system module and schemaVersion; fails without them."""
    return load_schemas(Path(os.environ.get(SCHEMAS_DIR_ENV) or DEFAULT_SCHEMAS_DIR))


def schema_errors(manifest: dict[str, Any]) -> list[str]:
    """What the published schemas find wrong: `$edgeAgent` and `$edgeHub` each against the schema
    of its schemaVersion (as `az iot edge` and IoT Hub validate them)."""
    content = manifest["modulesContent"]
    errors = []
    for twin in ("$edgeAgent", "$edgeHub"):
        validator = published_schemas()[twin][content[twin][DESIRED]["schemaVersion"]]
        errors += [
            f"{twin}: {'/'.join(map(str, error.absolute_path))}: {error.message}"
            for error in validator.iter_errors({twin: content[twin]})
        ]
    return errors


SETTINGS = {
    "defaults": ManifestSettings(image=dm.DEFAULT_IMAGE),
    "registry, env, options and TTL": ManifestSettings(
        image="turbofan-edge:0.2.0",
        registry="contoso.azurecr.io",
        env={"TURBOFAN_LANDING_CONTAINER": "landing", "TURBOFAN_EDGE_ADMIN_KEY_FILE": "/run/key", "N": 3},
        create_options={"HostConfig": {"Binds": ["state:/var/lib/turbofan"], "Memory": 536870912}},
        runtime_version="1.4",
        ttl_seconds=86400,
    ),
}


def made_manifests() -> dict[str, dict[str, Any]]:
    """Every kind of manifest the code sends: built from each settings, and as the IoT Hub target
    sends one with registry credentials added."""
    made = {name: dm.build(settings, MODEL) for name, settings in SETTINGS.items()}
    made["with registry credentials"] = dm.with_registry_credentials(
        made["registry, env, options and TTL"], "pull-user", "pull-password"
    )
    return made


@pytest.mark.parametrize("name", list(made_manifests()))
def test_every_manifest_made_is_valid_by_the_published_schemas(name: str) -> None:
    manifest = made_manifests()[name]
    assert schema_errors(manifest) == []
    content = manifest["modulesContent"]
    assert content["$edgeAgent"][DESIRED]["schemaVersion"] == "1.1"
    assert content["$edgeHub"][DESIRED]["schemaVersion"] == "1.2"
    if name != "with registry credentials":  # that one is sent, never stored: ours refuses it
        dm.validate(manifest)


def test_the_manifest_runs_the_module_routes_its_messages_and_names_the_model() -> None:
    settings = SETTINGS["registry, env, options and TTL"]
    content = dm.build(settings, MODEL)["modulesContent"]
    agent, hub = content["$edgeAgent"][DESIRED], content["$edgeHub"][DESIRED]
    module = agent["modules"]["turbofan"]
    assert module["settings"]["image"] == "contoso.azurecr.io/turbofan-edge:0.2.0"
    assert json.loads(module["settings"]["createOptions"]) == settings.create_options
    assert module["env"]["TURBOFAN_LANDING_CONTAINER"] == {"value": "landing"}
    assert agent["systemModules"]["edgeHub"]["settings"]["image"] == "mcr.microsoft.com/azureiotedge-hub:1.4"
    assert set(hub["routes"].values()) == {
        "FROM /messages/* WHERE NOT IS_DEFINED($connectionModuleId) "
        'INTO BrokeredEndpoint("/modules/turbofan/inputs/telemetry")',
        "FROM /messages/modules/turbofan/outputs/* INTO $upstream",
    }
    assert hub["storeAndForwardConfiguration"] == {"timeToLiveSecs": 86400}
    assert content["turbofan"][DESIRED] == {"model": MODEL}
    assert dm.model_reference({"modulesContent": content}) == MODEL

    default = dm.build(SETTINGS["defaults"], MODEL)["modulesContent"]
    assert default["$edgeHub"][DESIRED]["storeAndForwardConfiguration"] == {"timeToLiveSecs": 7200}
    assert default["$edgeAgent"][DESIRED]["modules"]["turbofan"]["settings"]["image"] == "turbofan-edge:0.1.0"


def test_the_default_image_is_what_the_module_json_builds() -> None:
    image = json.loads((REPO_ROOT / "edge_module" / "module.json").read_text())["image"]
    repository = image["repository"].rsplit("/", 1)[-1]
    assert f"{repository}:{image['tag']['version']}" == dm.DEFAULT_IMAGE


AGENT = ("modulesContent", "$edgeAgent", DESIRED)
MODULE = (*AGENT, "modules", "turbofan")
HUB = ("modulesContent", "$edgeHub", DESIRED)


def _delete(*path: str) -> Callable[[dict], None]:
    def change(manifest: dict) -> None:
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]

    return change


def _set(value: Any, *path: str) -> Callable[[dict], None]:
    def change(manifest: dict) -> None:
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value

    return change


# (what is broken, the change, the problem our validator reports, whether the published schema
# refuses it too: the rest are rules of this project or of IoT Edge beyond the schema)
BROKEN = [
    (
        "module image missing",
        _delete(*MODULE, "settings", "image"),
        "modulesContent.$edgeAgent.properties.desired.modules.turbofan.settings.image: missing",
        True,
    ),
    (
        "restart policy misspelt",
        _set("sometimes", *MODULE, "restartPolicy"),
        "modulesContent.$edgeAgent.properties.desired.modules.turbofan.restartPolicy: 'sometimes' is not one "
        "of never, on-failure, on-unhealthy, always",
        True,
    ),
    (
        "an unknown module property",
        _set("1", *MODULE, "restartpolicy"),
        "modulesContent.$edgeAgent.properties.desired.modules.turbofan.restartpolicy: unexpected",
        True,
    ),
    (
        "edgeHub without status",
        _delete(*AGENT, "systemModules", "edgeHub", "status"),
        "modulesContent.$edgeAgent.properties.desired.systemModules.edgeHub.status: missing",
        True,
    ),
    (
        "runtime missing",
        _delete(*AGENT, "runtime"),
        "modulesContent.$edgeAgent.properties.desired.runtime: missing",
        True,
    ),
    (
        "create options not JSON",
        _set("{HostConfig:", *MODULE, "settings", "createOptions"),
        "modulesContent.$edgeAgent.properties.desired.modules.turbofan.settings.createOptions: not JSON",
        False,
    ),
    (
        "a secret in the environment",
        _set({"value": "s3cret"}, *MODULE, "env", "TURBOFAN_EDGE_ADMIN_KEY"),
        "modulesContent.$edgeAgent.properties.desired.modules.turbofan.env.TURBOFAN_EDGE_ADMIN_KEY: "
        "looks like a secret",
        False,
    ),
    (
        "registry credentials stored",
        _set(
            {"r": {"address": "a.io", "username": "u", "password": "p"}},
            *AGENT,
            "runtime",
            "settings",
            "registryCredentials",
        ),  # fmt: skip
        "modulesContent.$edgeAgent.properties.desired.runtime.settings.registryCredentials: a secret",
        False,
    ),
    (
        "the turbofan module not deployed",
        _delete(*AGENT, "modules", "turbofan"),
        "modulesContent.$edgeAgent.properties.desired.modules.turbofan: missing",
        False,
    ),
    (
        "a route into a module that is not deployed",
        _set(
            'FROM /messages/* INTO BrokeredEndpoint("/modules/filter/inputs/in")', *HUB, "routes", "toFilter"
        ),
        "modulesContent.$edgeHub.properties.desired.routes.toFilter: module 'filter' is not deployed",
        False,
    ),
    (
        "a route that is not a route",
        _set("SELECT * INTO $upstream", *HUB, "routes", "bad"),
        "modulesContent.$edgeHub.properties.desired.routes.bad: not FROM <source>",
        False,
    ),
    (
        "store-and-forward TTL negative",
        _set(-1, *HUB, "storeAndForwardConfiguration", "timeToLiveSecs"),
        "modulesContent.$edgeHub.properties.desired.storeAndForwardConfiguration.timeToLiveSecs: -1 is not",
        False,
    ),
    (
        "hub schema version unknown",
        _set("2.0", *HUB, "schemaVersion"),
        "modulesContent.$edgeHub.properties.desired.schemaVersion: '2.0' is not one of",
        False,  # the schema of version 2.0 does not exist to refuse it
    ),
    (
        "model sha256 not a hash",
        _set("latest", "modulesContent", "turbofan", DESIRED, "model", "sha256"),
        "modulesContent.turbofan.properties.desired.model.sha256: not a sha256",
        False,
    ),
    (
        "model uri missing",
        _delete("modulesContent", "turbofan", DESIRED, "model", "uri"),
        "modulesContent.turbofan.properties.desired.model.uri: missing",
        False,
    ),
    (
        "the module twin missing",
        _delete("modulesContent", "turbofan"),
        "modulesContent.turbofan: missing",
        False,
    ),
]


@pytest.mark.parametrize(
    ("broken", "change", "problem", "schema_refuses"), BROKEN, ids=[b[0] for b in BROKEN]
)
def test_the_validator_refuses_a_broken_manifest_with_the_path_of_the_problem(
    broken: str,
    change: Callable[[dict], None],
    problem: str,
    schema_refuses: bool,
) -> None:
    manifest = copy.deepcopy(dm.build(SETTINGS["defaults"], MODEL))
    change(manifest)
    with pytest.raises(ManifestError) as refused:
        dm.validate(manifest)
    assert [p for p in refused.value.problems if p.startswith(problem)], refused.value.problems
    assert problem.split(":")[0] in str(refused.value)
    if schema_refuses:
        assert schema_errors(manifest), f"the published schema accepts: {broken}"


def test_every_problem_is_reported_at_once() -> None:
    manifest = copy.deepcopy(dm.build(SETTINGS["defaults"], MODEL))
    for _, change, _, _ in BROKEN[:3]:
        change(manifest)
    with pytest.raises(ManifestError) as refused:
        dm.validate(manifest)
    assert len(refused.value.problems) == 3
    with pytest.raises(ManifestError, match="^invalid deployment manifest:\nmanifest: not an object"):
        dm.validate([])


def test_model_reference_names_what_is_missing() -> None:
    manifest = dm.build(SETTINGS["defaults"], MODEL)
    del manifest["modulesContent"]["turbofan"][DESIRED]["model"]
    with pytest.raises(ManifestError, match=r"modulesContent\.turbofan\.properties\.desired\.model: missing"):
        dm.model_reference(manifest)


def test_credentials_need_an_image_from_a_registry() -> None:
    local = dm.build(SETTINGS["defaults"], MODEL)  # `turbofan-edge:0.1.0`: no registry server
    with pytest.raises(ManifestError, match="names no registry"):
        dm.with_registry_credentials(local, "u", "p")
    remote = dm.build(SETTINGS["registry, env, options and TTL"], MODEL)
    sent = dm.with_registry_credentials(remote, "u", "p")
    runtime = sent["modulesContent"]["$edgeAgent"][DESIRED]["runtime"]["settings"]
    assert runtime["registryCredentials"] == {
        "turbofan": {"address": "contoso.azurecr.io", "username": "u", "password": "p"}
    }
    assert "registryCredentials" not in json.dumps(remote)  # the original is left as it was


def test_a_manifest_is_stored_under_the_hash_of_its_canonical_json(tmp_path: Path) -> None:
    manifest = dm.build(SETTINGS["defaults"], MODEL)
    reordered = json.loads(json.dumps(manifest, sort_keys=True))
    reordered["modulesContent"] = dict(reversed(list(reordered["modulesContent"].items())))
    assert dm.canonical_bytes(reordered) == dm.canonical_bytes(manifest)

    store = LocalStore(tmp_path)
    sha256 = dm.save(store, manifest)
    assert sha256 == dm.manifest_sha256(manifest)
    assert store.list_names() and list(store.list_names()) == [f"manifests/{sha256}.json"]
    assert dm.save(store, reordered) == sha256  # the same manifest again: nothing new
    assert list(store.list_names()) == [f"manifests/{sha256}.json"]
    assert dm.load(store, sha256) == manifest

    other = dm.build(SETTINGS["defaults"], {**MODEL, "version": "8"})
    assert dm.manifest_sha256(other) != sha256

    path = tmp_path / "manifests" / f"{sha256}.json"
    path.chmod(0o644)
    path.write_bytes(dm.canonical_bytes(other))  # altered in place
    with pytest.raises(ManifestError, match="hashes to"):
        dm.load(store, sha256)
    with pytest.raises(ManifestError, match="hashes to"):
        dm.save(store, manifest)  # the name holds other content: refused, not overwritten
