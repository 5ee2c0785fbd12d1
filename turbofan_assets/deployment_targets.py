"""Deployment targets: where `edge_deployment` applies a manifest, chosen by configuration.

`LocalEdge` is a running edge module on this machine or network: it takes the manifest's model
(PUT /admin/model, then GET /model to confirm what it serves); its image and routes are what it
already runs. `IoTHubEdge` hands the whole manifest to one IoT Edge device through IoT Hub's
applyConfigurationContent, whose edgeAgent then runs it. A target that does not take the
manifest raises DeploymentRefused with its reason.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from dagster import ConfigurableResource

from turbofan_core.deployment_manifest import model_reference, with_registry_credentials
from turbofan_core.env_secrets import ADMIN_KEY_ENV, ADMIN_KEY_FILE_ENV, secret_from_env
from turbofan_warehouse.deployments import APPLIED, SENT

# Which target the code location deploys to: an IoT Edge device through IoT Hub when the device
# is named, else the local edge module at TURBOFAN_EDGE_URL.
EDGE_URL_ENV = "TURBOFAN_EDGE_URL"
IOTHUB_DEVICE_ENV = "TURBOFAN_IOTHUB_EDGE_DEVICE"
DEFAULT_EDGE_URL = "http://127.0.0.1:8080"
# Credentials for the registry of the module image, which the IoT Hub target adds as it sends.
REGISTRY_USERNAME_ENV = "TURBOFAN_REGISTRY_USERNAME"
REGISTRY_PASSWORD_ENV = "TURBOFAN_REGISTRY_PASSWORD"
REGISTRY_PASSWORD_FILE_ENV = "TURBOFAN_REGISTRY_PASSWORD_FILE"


class DeploymentRefused(Exception):
    """The target did not take the manifest (it answered no, or could not be reached)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _NoAnswer(DeploymentRefused):
    """The target could not be reached, or its answer was lost: the manifest may have been applied."""


class DeploymentTarget(ConfigurableResource):
    """What `edge_deployment` asks for: somewhere a manifest can be applied."""

    def name(self) -> str:
        """How the deployments table names this target."""
        raise NotImplementedError

    def apply(self, manifest: dict[str, Any]) -> str:
        """Apply the (validated) manifest: APPLIED (it serves it) or SENT (it took it and applies it
        on its own), or raise DeploymentRefused with the target's reason."""
        raise NotImplementedError


def _admin_key() -> str:
    """The admin key as the edge module reads it."""
    key = secret_from_env(ADMIN_KEY_ENV, ADMIN_KEY_FILE_ENV)
    if key is None:
        raise RuntimeError(f"no edge admin key: set {ADMIN_KEY_ENV} or {ADMIN_KEY_FILE_ENV}")
    return key


def _with_registry_credentials(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest to send: with the image registry's credentials when they are configured."""
    username = os.environ.get(REGISTRY_USERNAME_ENV, "").strip()
    password = secret_from_env(REGISTRY_PASSWORD_ENV, REGISTRY_PASSWORD_FILE_ENV)
    if not username and password is None:
        return manifest
    if not username or password is None:
        raise RuntimeError(
            f"registry credentials need both {REGISTRY_USERNAME_ENV} and {REGISTRY_PASSWORD_ENV} "
            f"(or {REGISTRY_PASSWORD_FILE_ENV})"
        )
    return with_registry_credentials(manifest, username, password)


class LocalEdge(DeploymentTarget):
    """A running edge module, switched to the manifest's model through its admin API."""

    url: str = DEFAULT_EDGE_URL
    timeout_seconds: float = 120.0
    """Per request: the edge answers the PUT once it has fetched, verified, loaded and warmed the bundle."""

    def name(self) -> str:
        return f"local:{self.url.rstrip('/')}"

    def apply(self, manifest: dict[str, Any]) -> str:
        """Set the model, then ask what the edge serves: that, not the PUT's answer, is the result (a
        PUT that timed out may still have switched the model; one that was refused did not)."""
        wanted = model_reference(manifest)
        try:
            self._call("PUT", "/admin/model", wanted, {"Authorization": f"Bearer {_admin_key()}"})
        except _NoAnswer as lost:  # a refusal the edge answered is final; this outcome is unknown
            failure: DeploymentRefused | None = lost
        else:
            failure = None
        try:
            served = self._call("GET", "/model")
        except DeploymentRefused:
            served = {}
        if served.get("sha256") == wanted["sha256"]:  # the bundle's hash is the model's identity
            return APPLIED
        if failure is not None:
            raise failure
        raise DeploymentRefused(
            f"the edge accepted version {wanted['version']} ({wanted['sha256']}) but serves "
            f"version {served.get('version')} ({served.get('sha256')})"
        )

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        url = self.url.rstrip("/") + path
        request = urllib.request.Request(
            url,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise DeploymentRefused(f"{method} {url} answered {error.code}: {_detail(error)}") from None
        except (OSError, ValueError) as error:  # unreachable, timed out, or not JSON
            raise _NoAnswer(f"{method} {url} failed: {type(error).__name__}: {error}") from None


def _detail(error: urllib.error.HTTPError) -> str:
    """FastAPI's `detail`, else the start of the body."""
    text = error.read().decode("utf-8", "replace")
    try:
        return str(json.loads(text)["detail"])
    except (ValueError, KeyError, TypeError):
        return text[:500] or error.reason


class IoTHubEdge(DeploymentTarget):
    """An IoT Edge device, given the manifest through IoT Hub (the connection string from
    IOTHUB_CONNECTION_STRING, read when applying)."""

    device_id: str

    def name(self) -> str:
        return f"iothub:{self.device_id}"

    def apply(self, manifest: dict[str, Any]) -> str:
        """SENT once IoT Hub takes the configuration: the device's edgeAgent applies it later, and the
        turbofan module does not yet read its twin's desired model (docs/architecture.md)."""
        from azure.iot.hub.models import ConfigurationContent

        from turbofan_core.azure_settings import IoTHubError, SettingError, iothub_configuration_manager

        manager = iothub_configuration_manager()  # a missing or malformed setting fails here, unsent
        content = ConfigurationContent(modules_content=_with_registry_credentials(manifest)["modulesContent"])
        try:
            manager.apply_configuration_on_edge_device(self.device_id, content)
        except (IoTHubError, SettingError) as error:  # a refusal, or a hub that cannot be reached
            raise DeploymentRefused(str(error)) from None
        return SENT


def deployment_target() -> DeploymentTarget:
    """The IoT Hub target when TURBOFAN_IOTHUB_EDGE_DEVICE names a device, else the local edge."""
    device = os.environ.get(IOTHUB_DEVICE_ENV, "").strip()
    if device:
        return IoTHubEdge(device_id=device)
    return LocalEdge(url=os.environ.get(EDGE_URL_ENV, DEFAULT_EDGE_URL))
