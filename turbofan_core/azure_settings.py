"""One configuration for every Azure client: the simulator, the Dagster resources, the deployment
target and the edge read the same settings, from the environment only.

One connection string per service: `AZURE_STORAGE_CONNECTION_STRING` for Blob storage (the landing
zone and model containers) and `IOTHUB_CONNECTION_STRING`, a shared-access policy's, for IoT Hub's
service API. Every client made here times out and retries a bounded number of times, so a wrong
endpoint fails within seconds (the SDKs' defaults wait minutes), and every failure to reach or
authenticate names the setting, never its secret: a `SettingError`.

Nothing heavy at import: azure-storage-blob and azure-iot-hub are imported by the functions that
use them, so the edge image and `turbofan --help` pay nothing for them.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from turbofan_core.storage import CONNECTION_STRING_ENV, LANDING_CONTAINER_ENV

if TYPE_CHECKING:
    from azure.storage.blob import BlobServiceClient

    from turbofan_core.storage import BlobStore, ObjectStore

STORAGE_CONNECTION_STRING_ENV = CONNECTION_STRING_ENV
IOTHUB_CONNECTION_STRING_ENV = "IOTHUB_CONNECTION_STRING"
CONNECT_TIMEOUT_ENV = "TURBOFAN_AZURE_CONNECT_TIMEOUT_S"
READ_TIMEOUT_ENV = "TURBOFAN_AZURE_READ_TIMEOUT_S"
RETRIES_ENV = "TURBOFAN_AZURE_RETRIES"
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 2
_BACKOFF_S = 1  # seconds between attempts (IoT Hub's urllib3 doubles it, up to 4)

# Connection-string fields that are secrets: never echoed, and cut out of library messages.
_SECRET_FIELDS = ("AccountKey", "SharedAccessSignature", "SharedAccessKey")
_STORAGE_FIELDS = frozenset(
    {
        "DefaultEndpointsProtocol",
        "AccountName",
        "AccountKey",
        "EndpointSuffix",
        "BlobEndpoint",
        "QueueEndpoint",
        "TableEndpoint",
        "FileEndpoint",
        "SharedAccessSignature",
        "UseDevelopmentStorage",
        "DevelopmentStorageProxyUri",
        "BlobSecondaryEndpoint",
        "QueueSecondaryEndpoint",
        "TableSecondaryEndpoint",
        "FileSecondaryEndpoint",
    }
)
_IOTHUB_FIELDS = frozenset({"HostName", "SharedAccessKeyName", "SharedAccessKey"})
_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}(:[0-9]{1,5})?")


class SettingError(ValueError):
    """A setting that is missing or malformed, or names a service that cannot be reached or refuses
    its credential. The message starts with the setting's name and never holds its secret."""


class IoTHubError(RuntimeError):
    """IoT Hub answered, and refused the request: `status` (404...) and IoT Hub's `code`
    (`DeviceNotFound`...) say why; the message is IoT Hub's own, which holds no secret."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class ClientPolicy:
    """How long a client waits and how often it tries again, the same for every Azure client."""

    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    retries: int = DEFAULT_RETRIES


@dataclass(frozen=True)
class StorageAccount:
    """A storage connection string, checked, and the account URL it names (no secret in it)."""

    account_url: str
    connection_string: str = field(repr=False)


@dataclass(frozen=True)
class IoTHubSettings:
    """A shared-access policy's connection string for IoT Hub's service API, checked."""

    hostname: str
    policy_name: str
    connection_string: str = field(repr=False)

    @property
    def endpoint(self) -> str:
        return f"https://{self.hostname}"


def client_policy(env: Mapping[str, str] | None = None) -> ClientPolicy:
    """Timeouts and retries from the environment, the defaults where unset."""
    env = os.environ if env is None else env
    return ClientPolicy(
        connect_timeout_s=_number(env, CONNECT_TIMEOUT_ENV, float, DEFAULT_CONNECT_TIMEOUT_S, minimum=0.1),
        read_timeout_s=_number(env, READ_TIMEOUT_ENV, float, DEFAULT_READ_TIMEOUT_S, minimum=0.1),
        retries=_number(env, RETRIES_ENV, int, DEFAULT_RETRIES, minimum=0),
    )


def _number(
    env: Mapping[str, str], name: str, kind: Callable[[str], Any], default: Any, minimum: float
) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not value >= minimum:  # `not >=` also refuses nan
        what = "a whole number" if kind is int else "a number of seconds"
        raise SettingError(f"{name}: {raw!r} is not {what} of at least {minimum:g}")
    return value


def _connection_string(setting: str, value: str | None, env: Mapping[str, str] | None) -> str:
    if value is None:
        value = (os.environ if env is None else env).get(setting, "")
    if not value.strip():
        raise SettingError(f"{setting} is not set")
    return value.strip()


def _fields(setting: str, value: str, known: frozenset[str]) -> dict[str, str]:
    """`Name=value;...` as a dict; errors name the setting and the field, never a value."""
    fields: dict[str, str] = {}
    for part in value.strip().strip(";").split(";"):
        name, sep, content = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise SettingError(
                f"{setting} is not a connection string: expected Name=value pairs separated by ';'"
            )
        if name not in known:
            raise SettingError(f"{setting}: unknown field {name!r} in the connection string")
        if name in fields:
            raise SettingError(f"{setting}: field {name!r} is given twice")
        fields[name] = content.strip()
    return fields


def _check_key(setting: str, name: str, key: str) -> None:
    try:
        if base64.b64decode(key, validate=True):
            return
    except (binascii.Error, ValueError):
        pass
    raise SettingError(f"{setting}: {name} is not a base64 key")


def storage_account(
    connection_string: str | None = None, env: Mapping[str, str] | None = None
) -> StorageAccount:
    """The storage connection string (`AZURE_STORAGE_CONNECTION_STRING` unless given), checked: an
    account key or a SAS, and an endpoint (`UseDevelopmentStorage=true` is Azurite's default)."""
    setting = STORAGE_CONNECTION_STRING_ENV
    value = _connection_string(setting, connection_string, env)
    fields = _fields(setting, value, _STORAGE_FIELDS)
    if fields.get("UseDevelopmentStorage", "").lower() != "true":
        if "AccountKey" not in fields and "SharedAccessSignature" not in fields:
            raise SettingError(f"{setting}: needs AccountKey or SharedAccessSignature")
        if "AccountName" not in fields and "BlobEndpoint" not in fields:
            raise SettingError(f"{setting}: needs AccountName or BlobEndpoint")
        if "AccountKey" in fields:
            _check_key(setting, "AccountKey", fields["AccountKey"])
    from azure.storage.blob import BlobServiceClient  # parses the endpoint as the SDK will use it

    try:
        url = BlobServiceClient.from_connection_string(value).url
    except ValueError:
        raise SettingError(f"{setting} is not a valid storage connection string") from None
    # A SAS connection string puts its token in the URL's query: never part of what is shown.
    return StorageAccount(account_url=url.partition("?")[0].rstrip("/"), connection_string=value)


def blob_service_client(
    connection_string: str | None = None, env: Mapping[str, str] | None = None
) -> BlobServiceClient:
    """A Blob service client with this module's timeouts and bounded retries."""
    from azure.storage.blob import BlobServiceClient, LinearRetry

    account = storage_account(connection_string, env)
    policy = client_policy(env)
    return BlobServiceClient.from_connection_string(
        account.connection_string,
        connection_timeout=policy.connect_timeout_s,
        read_timeout=policy.read_timeout_s,
        retry_policy=LinearRetry(
            backoff=_BACKOFF_S, retry_total=policy.retries, random_jitter_range=_BACKOFF_S
        ),
    )


@contextmanager
def storage_errors_named(account: StorageAccount) -> Iterator[None]:
    """Turn the Blob client's failures to reach or authenticate into SettingErrors naming the setting."""
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    setting, endpoint = STORAGE_CONNECTION_STRING_ENV, account.account_url
    try:
        yield
    except (ServiceRequestError, ServiceResponseError) as error:
        reason = redact(_reason(error), account.connection_string)
        raise SettingError(f"{setting}: cannot reach {endpoint}: {reason}") from None
    except HttpResponseError as error:
        if error.status_code not in (401, 403):
            raise
        code = getattr(error, "error_code", None) or error.reason
        raise SettingError(
            f"{setting}: {endpoint} refused the credential ({error.status_code} {code})"
        ) from None


def blob_store(
    container: str,
    prefix: str = "",
    connection_string: str | None = None,
    env: Mapping[str, str] | None = None,
) -> BlobStore:
    """A BlobStore on `container` (created when missing, which also proves the account answers)."""
    from turbofan_core.storage import BlobStore

    account = storage_account(connection_string, env)
    service = blob_service_client(account.connection_string, env)
    with storage_errors_named(account):
        return BlobStore.created_if_missing(service.get_container_client(container), prefix)


def landing_store_from_env(default_local: Path, env: Mapping[str, str] | None = None) -> ObjectStore:
    """The landing zone: the container `TURBOFAN_LANDING_CONTAINER` names, on the account of
    `AZURE_STORAGE_CONNECTION_STRING`, when it is set; else the local folder `default_local`."""
    from turbofan_core.storage import LocalStore

    container = (os.environ if env is None else env).get(LANDING_CONTAINER_ENV, "").strip()
    if not container:
        return LocalStore(default_local)
    return blob_store(container, env=env)


def iothub_settings(
    connection_string: str | None = None, env: Mapping[str, str] | None = None
) -> IoTHubSettings:
    """`IOTHUB_CONNECTION_STRING` (unless given), checked: a shared-access policy's connection
    string (`HostName=...;SharedAccessKeyName=...;SharedAccessKey=...`), not a device's."""
    setting = IOTHUB_CONNECTION_STRING_ENV
    value = _connection_string(setting, connection_string, env)
    if re.search(r"(^|;)\s*(DeviceId|ModuleId)\s*=", value):
        raise SettingError(
            f"{setting} is a device's connection string; the service API needs a shared access "
            "policy's (HostName=...;SharedAccessKeyName=...;SharedAccessKey=...)"
        )
    fields = _fields(setting, value, _IOTHUB_FIELDS)
    missing = sorted(_IOTHUB_FIELDS - {name for name, content in fields.items() if content})
    if missing:
        raise SettingError(f"{setting}: needs {', '.join(missing)}")
    if not _HOSTNAME.fullmatch(fields["HostName"]):
        raise SettingError(f"{setting}: HostName {fields['HostName']!r} is not a host name")
    _check_key(setting, "SharedAccessKey", fields["SharedAccessKey"])
    return IoTHubSettings(fields["HostName"], fields["SharedAccessKeyName"], value)


class IoTHubClient:
    """An azure-iot-hub manager whose every call fails as this module says: a SettingError naming
    `IOTHUB_CONNECTION_STRING` when IoT Hub cannot be reached or refuses the policy key, an
    IoTHubError for any other refusal. Everything else is the SDK's own manager."""

    def __init__(self, manager: Any, settings: IoTHubSettings) -> None:
        self._manager = manager
        self._settings = settings

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._manager, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            with _iothub_errors_named(self._settings):
                return attribute(*args, **kwargs)

        return call


def iothub_registry_manager(
    connection_string: str | None = None, env: Mapping[str, str] | None = None
) -> IoTHubClient:
    """azure-iot-hub's IoTHubRegistryManager (device identities) with bounded timeouts and retries."""
    from azure.iot.hub import IoTHubRegistryManager

    return _iothub_client(IoTHubRegistryManager, connection_string, env)


def iothub_configuration_manager(
    connection_string: str | None = None, env: Mapping[str, str] | None = None
) -> IoTHubClient:
    """azure-iot-hub's IoTHubConfigurationManager (deployments, `applyConfigurationContent`) with
    bounded timeouts and retries."""
    from azure.iot.hub import IoTHubConfigurationManager

    return _iothub_client(IoTHubConfigurationManager, connection_string, env)


def _iothub_client(kind: Any, connection_string: str | None, env: Mapping[str, str] | None) -> IoTHubClient:
    settings = iothub_settings(connection_string, env)
    policy = client_policy(env)
    manager = kind.from_connection_string(settings.connection_string)
    # msrest hands these to requests: (connect, read) timeouts; urllib3 retries with a short backoff.
    config = manager.protocol.config
    config.connection.timeout = (policy.connect_timeout_s, policy.read_timeout_s)
    config.retry_policy.retries = policy.retries
    config.retry_policy.backoff_factor = _BACKOFF_S
    config.retry_policy.max_backoff = 4 * _BACKOFF_S
    return IoTHubClient(manager, settings)


@contextmanager
def _iothub_errors_named(settings: IoTHubSettings) -> Iterator[None]:
    from msrest.exceptions import ClientRequestError, HttpOperationError

    setting, endpoint = IOTHUB_CONNECTION_STRING_ENV, settings.endpoint
    try:
        yield
    except HttpOperationError as error:
        status, code, message = _iothub_answer(error)
        if status in (401, 403):
            raise SettingError(
                f"{setting}: {endpoint} refused the shared access policy {settings.policy_name!r} "
                f"({status} {code})"
            ) from None
        raise IoTHubError(status, code, f"IoT Hub {endpoint} answered {status} {code}: {message}") from None
    except ClientRequestError as error:
        reason = redact(_reason(error), settings.connection_string)
        raise SettingError(f"{setting}: cannot reach {endpoint}: {reason}") from None


def _iothub_answer(error: Any) -> tuple[int, str, str]:
    """(status, IoT Hub's error code, its message) of an error answer: {"Message": "ErrorCode:X;text"}."""
    response = error.response
    try:
        body = json.loads(response.text)
        text = body.get("Message") or body.get("message") or ""
    except (ValueError, AttributeError):
        text = ""
    head, _, rest = str(text).partition(";")
    code = head.removeprefix("ErrorCode:") if head.startswith("ErrorCode:") else response.reason or "Error"
    return response.status_code, code, (rest or str(text) or response.reason or "").strip()


def _reason(error: BaseException) -> str:
    """The useful end of an HTTP library's error: `[Errno 111] Connection refused`, a TLS failure,
    a timeout, without the object reprs and retry bookkeeping around it."""
    text = " ".join(str(error).split())
    found = re.findall(r"\[Errno -?\d+\][^'\")]*|\[SSL[^\]]*\][^'\")]*|timed out|Read timed out", text)
    return found[-1].strip() if found else (text or type(error).__name__)[:300]


def redact(text: str, connection_string: str) -> str:
    """`text` without the secrets of `connection_string`, nor any SAS signature."""
    for part in connection_string.split(";"):
        name, _, value = part.partition("=")
        if name.strip() in _SECRET_FIELDS and value.strip():
            text = text.replace(value.strip(), "***")
    return re.sub(r"sig=[^&\s'\"]+", "sig=***", text)
