"""The IoT Edge deployment manifest: which modules run on the edge device, how messages flow
between them, and which model the turbofan module serves.

`build` writes it from settings and a model reference; `validate` checks it against the
structure Microsoft documents for deployment manifests (the `$edgeAgent` twin's schemaVersion,
runtime, systemModules and modules; the `$edgeHub` twin's schemaVersion, routes and
storeAndForwardConfiguration; the module twins' desired properties), plus what this project
requires: routes that reach deployed modules, the turbofan module's model reference, and no
secrets. A manifest is addressed by the sha256 of its canonical JSON. Pure Python, so the edge
module can read its desired model (`model_reference`) from a manifest too.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from turbofan_core.storage import NameTaken, ObjectStore

MODULE = "turbofan"  # the module's name in the deployment, and in its routes
MODEL_PROPERTY = "model"  # the module twin's desired property naming the model to serve
MODEL_FIELDS = ("version", "uri", "sha256")
TELEMETRY_INPUT = "telemetry"
AGENT_SCHEMA_VERSION = "1.1"
HUB_SCHEMA_VERSION = "1.2"
DEFAULT_IMAGE = "turbofan-edge:0.1.0"  # the repository and tag edge_module/module.json builds
DEFAULT_TTL_SECONDS = 7200
DEFAULT_RUNTIME_VERSION = "1.5"
MANIFEST_PREFIX = "manifests/"

# The module's REST port published on the host, and its state (devices, store, desired model) on a
# named volume, so a new container keeps what the old one had.
DEFAULT_CREATE_OPTIONS: dict[str, Any] = {
    "ExposedPorts": {"8080/tcp": {}},
    "HostConfig": {
        "PortBindings": {"8080/tcp": [{"HostPort": "8080"}]},
        "Binds": ["turbofan-state:/var/lib/turbofan"],
    },
}
# The ports leaf devices and modules reach edgeHub on: AMQP, MQTT, and both over WebSockets (443).
EDGE_HUB_CREATE_OPTIONS: dict[str, Any] = {
    "HostConfig": {
        "PortBindings": {
            port: [{"HostPort": port.split("/")[0]}] for port in ("5671/tcp", "8883/tcp", "443/tcp")
        }
    }
}

_AGENT_SCHEMA_VERSIONS = ("1.0", "1.1")
_HUB_SCHEMA_VERSIONS = ("1.0", "1.1", "1.2")
_MODULE_TYPES = ("docker",)
_STATUSES = ("running", "stopped")
_RESTART_POLICIES = ("never", "on-failure", "on-unhealthy", "always")
_PULL_POLICIES = ("never", "on-create")
_MODULE_NAME = re.compile(r"^[a-zA-Z0-9_-]+$")
_ENV_NAME = re.compile(r"^[^+#$\s.]+$")
_ROUTE_NAME = re.compile(r"^[^.$# ]+$")
_CREATE_OPTIONS_KEY = re.compile(r"^create[oO]ptions[0-9]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# FROM <source> [WHERE <condition>] INTO <sink>, the sink $upstream or a module's input.
_ROUTE = re.compile(
    r"^FROM\s+(?P<source>/\S*)(?:\s+WHERE\s+.+?)?\s+INTO\s+"
    r'(?:\$upstream|BrokeredEndpoint\(\s*"/modules/(?P<module>[^/"]+)/inputs/[^/"]+"\s*\))\s*$',
    re.IGNORECASE | re.DOTALL,
)
_OUTPUT_SOURCE = re.compile(r"^/messages/modules/(?P<module>[^/]+)/outputs/", re.IGNORECASE)
# Names that hold secrets by this project's conventions and Azure's (a `_FILE` naming a file is fine).
_SECRET_NAME = re.compile(r"(^|_)(KEY|PASSWORD|SECRET|TOKEN|CONNECTION_?STRING|SAS)$", re.IGNORECASE)


class ManifestError(ValueError):
    """A manifest that must not leave: every problem, each with the JSON path where it is."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid deployment manifest:\n" + "\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ManifestSettings:
    """What the deployment runs besides the model: the module image, its environment and options."""

    image: str  # repository:tag, e.g. turbofan-edge:0.1.0
    registry: str = ""  # the registry server, e.g. myregistry.azurecr.io; empty for a local image
    env: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    create_options: Mapping[str, Any] = field(default_factory=lambda: DEFAULT_CREATE_OPTIONS)
    runtime_version: str = DEFAULT_RUNTIME_VERSION  # of the edgeAgent and edgeHub images
    ttl_seconds: int = DEFAULT_TTL_SECONDS  # how long edgeHub keeps messages it cannot send upstream

    @property
    def module_image(self) -> str:
        return f"{self.registry.rstrip('/')}/{self.image}" if self.registry else self.image


def _options(options: Mapping[str, Any]) -> str:
    return json.dumps(options, sort_keys=True, separators=(",", ":"))


def build(settings: ManifestSettings, model: Mapping[str, str]) -> dict[str, Any]:
    """The manifest deploying the runtime and the turbofan module, serving `model` (version, uri, sha256)."""
    runtime = settings.runtime_version
    return {
        "modulesContent": {
            "$edgeAgent": {
                "properties.desired": {
                    "schemaVersion": AGENT_SCHEMA_VERSION,
                    "runtime": {"type": "docker", "settings": {}},
                    "systemModules": {
                        "edgeAgent": {
                            "type": "docker",
                            "settings": {"image": f"mcr.microsoft.com/azureiotedge-agent:{runtime}"},
                        },
                        "edgeHub": {
                            "type": "docker",
                            "status": "running",
                            "restartPolicy": "always",
                            "settings": {
                                "image": f"mcr.microsoft.com/azureiotedge-hub:{runtime}",
                                "createOptions": _options(EDGE_HUB_CREATE_OPTIONS),
                            },
                        },
                    },
                    "modules": {
                        MODULE: {
                            "version": "1.0",
                            "type": "docker",
                            "status": "running",
                            "restartPolicy": "always",
                            "settings": {
                                "image": settings.module_image,
                                "createOptions": _options(settings.create_options),
                            },
                            "env": {name: {"value": value} for name, value in sorted(settings.env.items())},
                        }
                    },
                }
            },
            "$edgeHub": {
                "properties.desired": {
                    "schemaVersion": HUB_SCHEMA_VERSION,
                    "routes": {
                        "devicesToTurbofan": "FROM /messages/* WHERE NOT IS_DEFINED($connectionModuleId) "
                        f'INTO BrokeredEndpoint("/modules/{MODULE}/inputs/{TELEMETRY_INPUT}")',
                        "turbofanToUpstream": f"FROM /messages/modules/{MODULE}/outputs/* INTO $upstream",
                    },
                    "storeAndForwardConfiguration": {"timeToLiveSecs": settings.ttl_seconds},
                }
            },
            MODULE: {"properties.desired": {MODEL_PROPERTY: {key: str(model[key]) for key in MODEL_FIELDS}}},
        }
    }


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Checker:
    """Collects problems, each as `path: what is wrong` (the manifest itself is `manifest`)."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, path: str, what: str) -> None:
        self.problems.append(f"{path or 'manifest'}: {what}")

    def object(
        self, value: Any, path: str, required: tuple[str, ...] = (), optional: tuple[str, ...] | None = ()
    ) -> dict[str, Any]:
        """`value` if it is an object (else {}), noting missing keys and, unless `optional` is None
        (any key goes), keys neither required nor optional."""
        if not isinstance(value, dict):
            self.problem(path, f"not an object ({value!r:.60})")
            return {}
        for key in required:
            if key not in value:
                self.problem(_at(path, key), "missing")
        for key in value:
            if optional is not None and key not in required and key not in optional:
                self.problem(_at(path, key), "unexpected")
        return value

    def member(
        self,
        parent: dict[str, Any],
        key: str,
        path: str,
        required: tuple[str, ...] = (),
        optional: tuple[str, ...] | None = (),
    ) -> dict[str, Any]:
        """The object at `parent[key]`, checked; {} when absent (the parent's check names that)."""
        return self.object(parent[key], _at(path, key), required, optional) if key in parent else {}

    def text(self, parent: dict[str, Any], key: str, path: str) -> None:
        if key in parent and (not isinstance(parent[key], str) or not parent[key].strip()):
            self.problem(_at(path, key), f"not a non-empty string ({parent[key]!r})")

    def one_of(self, parent: dict[str, Any], key: str, path: str, allowed: tuple[str, ...]) -> None:
        if key in parent and parent[key] not in allowed:
            self.problem(_at(path, key), f"{parent[key]!r} is not one of {', '.join(allowed)}")

    def count(self, parent: dict[str, Any], key: str, path: str, high: int) -> None:
        value = parent.get(key)
        if key in parent and (type(value) is not int or not 0 <= value <= high):
            self.problem(_at(path, key), f"{value!r} is not an integer from 0 to {high}")


def _module(check: _Checker, value: Any, path: str, system: str | None = None) -> None:
    """One module of `$edgeAgent`; `system` names the runtime's own (edgeAgent, edgeHub)."""
    if system == "edgeAgent":
        required, optional = ("type", "settings"), ("env", "imagePullPolicy")
    else:
        required = ("type", "settings", "status", "restartPolicy")
        optional = ("env", "imagePullPolicy", "startupOrder", *(() if system else ("version",)))
    module = check.object(value, path, required, optional)
    check.one_of(module, "type", path, _MODULE_TYPES)
    check.one_of(module, "status", path, _STATUSES)
    check.one_of(module, "restartPolicy", path, _RESTART_POLICIES)
    check.one_of(module, "imagePullPolicy", path, _PULL_POLICIES)
    check.count(module, "startupOrder", path, 2**32 - 1)
    check.text(module, "version", path)
    _settings(check, module, path)
    for name, variable in check.member(module, "env", path, optional=None).items():
        where = f"{path}.env.{name}"
        if not _ENV_NAME.match(name):
            check.problem(where, "not a valid variable name")
        if _SECRET_NAME.search(name):
            check.problem(where, "looks like a secret: a manifest is stored and shown, so it holds none")
        entry = check.object(variable, where, ("value",))
        if "value" in entry and not isinstance(entry["value"], str | int | float):
            check.problem(f"{where}.value", "not a string, number or boolean")


def _settings(check: _Checker, module: dict[str, Any], path: str) -> None:
    raw = module.get("settings")
    options = sorted(key for key in raw if _CREATE_OPTIONS_KEY.match(key)) if isinstance(raw, dict) else []
    settings = check.member(module, "settings", path, ("image",), tuple(options))
    path = f"{path}.settings"
    check.text(settings, "image", path)
    if not options:
        return
    if not all(isinstance(settings[key], str) for key in options):
        check.problem(f"{path}.{options[0]}", "not a string: create options are JSON in a string")
        return
    try:  # a long value may be split over createOptions, createOptions01, ... in that order
        parsed = json.loads("".join(settings[key] for key in options))
    except ValueError as error:
        check.problem(f"{path}.{options[0]}", f"not JSON: {error}")
        return
    if not isinstance(parsed, dict):
        check.problem(f"{path}.{options[0]}", "not a JSON object")


def _agent(check: _Checker, twin: dict[str, Any], path: str) -> set[str]:
    """Check the `$edgeAgent` twin; the names of the modules it deploys."""
    desired = check.member(
        twin, "properties.desired", path, ("schemaVersion", "runtime", "systemModules", "modules")
    )
    path = f"{path}.properties.desired"
    check.one_of(desired, "schemaVersion", path, _AGENT_SCHEMA_VERSIONS)
    runtime = check.member(desired, "runtime", path, ("type", "settings"))
    check.one_of(runtime, "type", f"{path}.runtime", _MODULE_TYPES)
    settings = check.member(
        runtime,
        "settings",
        f"{path}.runtime",
        optional=("minDockerVersion", "loggingOptions", "registryCredentials"),
    )
    if "registryCredentials" in settings:
        check.problem(
            f"{path}.runtime.settings.registryCredentials",
            "a secret: a manifest is stored and shown; the IoT Hub target adds credentials as it applies it",
        )
    system = check.member(desired, "systemModules", path, ("edgeAgent", "edgeHub"))
    for name in ("edgeAgent", "edgeHub"):
        if name in system:
            _module(check, system[name], f"{path}.systemModules.{name}", system=name)
    modules = check.member(desired, "modules", path, (MODULE,), None)
    for name, module in modules.items():
        if not _MODULE_NAME.match(name):
            check.problem(f"{path}.modules.{name}", "not a valid module name")
        _module(check, module, f"{path}.modules.{name}")
    return set(modules)


def _hub(check: _Checker, twin: dict[str, Any], path: str, modules: set[str]) -> None:
    desired = check.member(
        twin,
        "properties.desired",
        path,
        ("schemaVersion", "routes", "storeAndForwardConfiguration"),
        ("mqttBroker",),
    )
    path = f"{path}.properties.desired"
    check.one_of(desired, "schemaVersion", path, _HUB_SCHEMA_VERSIONS)
    routes = check.member(desired, "routes", path, optional=None)
    if "routes" in desired and not routes:
        check.problem(f"{path}.routes", "no routes: messages would go nowhere")
    for name, route in routes.items():
        _route(check, name, route, f"{path}.routes.{name}", modules)
    store = check.member(desired, "storeAndForwardConfiguration", path, ("timeToLiveSecs",))
    check.count(store, "timeToLiveSecs", f"{path}.storeAndForwardConfiguration", 2**31 - 1)


def _route(check: _Checker, name: str, route: Any, path: str, modules: set[str]) -> None:
    if not _ROUTE_NAME.match(name):
        check.problem(path, "not a valid route name")
    if isinstance(route, dict):
        entry = check.object(route, path, ("route",), ("priority", "timeToLiveSecs"))
        check.count(entry, "priority", path, 9)
        check.count(entry, "timeToLiveSecs", path, 2**32 - 1)
        if "route" not in entry:
            return
        route, path = entry["route"], f"{path}.route"
    parsed = _ROUTE.match(route.strip()) if isinstance(route, str) else None
    if parsed is None:
        check.problem(
            path, f"not FROM <source> [WHERE <condition>] INTO <$upstream or a module input>: {route!r}"
        )
        return
    output = _OUTPUT_SOURCE.match(parsed["source"])
    for module in (parsed["module"], output["module"] if output else None):
        if module is not None and module not in modules:
            check.problem(path, f"module {module!r} is not deployed")


def _model(check: _Checker, twin: dict[str, Any], path: str) -> None:
    desired = check.member(twin, "properties.desired", path, (MODEL_PROPERTY,), None)
    path = f"{path}.properties.desired"
    model = check.member(desired, MODEL_PROPERTY, path, MODEL_FIELDS)
    path = f"{path}.{MODEL_PROPERTY}"
    for key in MODEL_FIELDS:
        check.text(model, key, path)
    if isinstance(model.get("sha256"), str) and not _SHA256.match(model["sha256"]):
        check.problem(f"{path}.sha256", "not a sha256 (64 lowercase hexadecimal digits)")


def validate(manifest: Any) -> None:
    """Raise ManifestError listing every problem with its JSON path, e.g.
    `modulesContent.$edgeAgent.properties.desired.modules.turbofan.settings.image: missing`."""
    check = _Checker()
    top = check.object(manifest, "", ("modulesContent",))
    twins = check.member(top, "modulesContent", "", ("$edgeAgent", "$edgeHub", MODULE), None)
    checked = {
        name: check.object(twin, f"modulesContent.{name}", ("properties.desired",))
        for name, twin in twins.items()
    }
    modules = _agent(check, checked.get("$edgeAgent", {}), "modulesContent.$edgeAgent")
    _hub(check, checked.get("$edgeHub", {}), "modulesContent.$edgeHub", modules)
    for name, twin in checked.items():
        if name == MODULE:
            _model(check, twin, f"modulesContent.{name}")
        elif not name.startswith("$") and name not in modules:
            check.problem(f"modulesContent.{name}", "a twin of a module this manifest does not deploy")
    if check.problems:
        raise ManifestError(check.problems)


def model_reference(manifest: Mapping[str, Any]) -> dict[str, str]:
    """The model the turbofan module is to serve: version, uri and sha256, from its twin's desired
    properties."""
    try:
        model = manifest["modulesContent"][MODULE]["properties.desired"][MODEL_PROPERTY]
        return {key: model[key] for key in MODEL_FIELDS}
    except (KeyError, TypeError) as error:
        path = f"modulesContent.{MODULE}.properties.desired.{MODEL_PROPERTY}"
        raise ManifestError([f"{path}: missing ({error!r})"]) from None


def with_registry_credentials(manifest: Mapping[str, Any], username: str, password: str) -> dict[str, Any]:
    """A copy of `manifest` whose edgeAgent may pull the turbofan image from its registry with these
    credentials: what a target sends, never what is stored or shown (`validate` refuses it)."""
    content = copy.deepcopy(dict(manifest))
    desired = content["modulesContent"]["$edgeAgent"]["properties.desired"]
    image = desired["modules"][MODULE]["settings"]["image"]
    server, slash, _ = image.partition("/")
    if not slash or not ("." in server or ":" in server or server == "localhost"):  # Docker's rule
        path = f"modulesContent.$edgeAgent.properties.desired.modules.{MODULE}.settings.image"
        raise ManifestError([f"{path}: {image!r} names no registry to give credentials for"])
    desired["runtime"]["settings"]["registryCredentials"] = {
        MODULE: {"address": server, "username": username, "password": password}
    }
    return content


def canonical_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The manifest as JSON with sorted keys and no spaces: equal manifests, equal bytes."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def manifest_sha256(manifest: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_bytes(manifest)).hexdigest()


def manifest_name(sha256: str) -> str:
    return f"{MANIFEST_PREFIX}{sha256}.json"


def save(store: ObjectStore, manifest: Mapping[str, Any]) -> str:
    """Store the manifest under its sha256 and return the hash; storing it again is a no-op."""
    data = canonical_bytes(manifest)
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        store.create(manifest_name(sha256), data)
    except NameTaken:
        load(store, sha256)  # the name must hold the same content
    return sha256


def load(store: ObjectStore, sha256: str) -> dict[str, Any]:
    """The manifest stored under `sha256`, after checking its bytes hash to that name."""
    data = store.read(manifest_name(sha256))
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise ManifestError([f"{manifest_name(sha256)}: its content hashes to {found}"])
    return json.loads(data)
