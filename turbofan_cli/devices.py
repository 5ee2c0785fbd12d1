"""`turbofan devices create NAME... | list | remove NAME...`: device identities with symmetric keys.

By default in the edge's device registry (`devices.json`, mode 0600, in `--state`, default
`$TURBOFAN_HOME/edge`); with `--iothub`, in IoT Hub, through azure-iot-hub on the shared-access
policy of `IOTHUB_CONNECTION_STRING` (from the environment only: an argument would show in the
process list). `create` prints each device's connection string (primary key) on stdout, one per
line, the file `turbofan simulate --to iothub --connection-strings` reads; `list` prints ids only.
Every name is checked before anything changes, so a refused command changes nothing.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from edge_module.auth import (
    REGISTRY_FILENAME,
    DeviceIdentity,
    DeviceRegistry,
    RegistryError,
    connection_string,
)
from turbofan_cli import CommandError
from turbofan_core.azure_settings import IOTHUB_CONNECTION_STRING_ENV, IoTHubError, SettingError
from turbofan_core.home import Home


class _Registry(Protocol):
    """Where identities live: the edge's registry file, or IoT Hub."""

    where: str
    hostname: str  # the HostName of the devices' connection strings

    def ids(self) -> list[str]: ...

    def exists(self, device_id: str) -> bool: ...

    def create(self, device_id: str) -> DeviceIdentity: ...

    def remove(self, device_id: str) -> None: ...


def configure(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--iothub",
        action="store_true",
        help=f"IoT Hub's registry, through the policy in env {IOTHUB_CONNECTION_STRING_ENV}, "
        "instead of the edge's",
    )
    common.add_argument(
        "--state", type=Path, metavar="DIR", help="the edge's state folder (default: $TURBOFAN_HOME/edge)"
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create", parents=[common], help="new devices with fresh keys; prints their connection strings"
    )
    create.add_argument("names", nargs="+", metavar="NAME", help="device ids, e.g. Client_001")
    create.add_argument(
        "--hub-hostname",
        type=_host,
        metavar="HOST",
        help="the HostName of the printed connection strings, for the edge's registry (default: this "
        "machine's host name, where the edge runs); with --iothub it is the hub's",
    )
    create.add_argument(
        "--gateway-host",
        type=_host,
        metavar="HOST",
        help="add GatewayHostName=HOST: the device connects through the edge's gateway at HOST",
    )
    create.set_defaults(run=run_create)
    listing = actions.add_parser("list", parents=[common], help="the registered device ids (never keys)")
    listing.set_defaults(run=run_list)
    remove = actions.add_parser("remove", parents=[common], help="delete devices and their keys")
    remove.add_argument("names", nargs="+", metavar="NAME")
    remove.set_defaults(run=run_remove)


def run_create(args: argparse.Namespace) -> int:
    _distinct(args.names)
    with _registry(args) as registry:
        taken = [name for name in args.names if registry.exists(name)]
        if taken:
            raise CommandError(f"already registered in {registry.where}: {', '.join(taken)}; nothing created")
        for name in args.names:  # each string printed as its device is made: a failure part way
            identity = registry.create(name)  # leaves no device whose keys were not shown
            print(connection_string(identity, registry.hostname, args.gateway_host), flush=True)
    print(
        f"created {len(args.names)} devices in {registry.where}; their connection strings hold keys: "
        "keep them secret",
        file=sys.stderr,
    )
    return 0


def run_list(args: argparse.Namespace) -> int:
    with _registry(args) as registry:
        ids = registry.ids()
    if ids:
        print("\n".join(ids))
    print(f"{len(ids)} devices in {registry.where}", file=sys.stderr)
    return 0


def run_remove(args: argparse.Namespace) -> int:
    _distinct(args.names)
    with _registry(args) as registry:
        unknown = [name for name in args.names if not registry.exists(name)]
        if unknown:
            raise CommandError(f"not registered in {registry.where}: {', '.join(unknown)}; nothing removed")
        for name in args.names:
            registry.remove(name)
    print(f"removed {len(args.names)} devices from {registry.where}", file=sys.stderr)
    return 0


def _host(text: str) -> str:
    """A host name or address, optionally with a port: nothing that could break a connection string."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.:\[\]-]{0,252}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name")
    return text


def _distinct(names: list[str]) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CommandError(f"named more than once: {', '.join(repeated)}")


@contextmanager
def _registry(args: argparse.Namespace) -> Iterator[_Registry]:
    """The chosen registry; its errors (which never hold a key) as one-line CommandErrors."""
    if args.iothub:
        given = [flag for flag in ("state", "hub_hostname") if getattr(args, flag, None)]
        if given:
            flags = ", ".join(f"--{flag.replace('_', '-')}" for flag in given)
            raise CommandError(f"{flags} apply to the edge's registry, not to --iothub")
        try:
            yield _IoTHubRegistry()
        except (SettingError, IoTHubError) as error:
            raise CommandError(str(error)) from None
        return
    state = args.state or Home.from_env().root / "edge"
    try:
        yield _LocalRegistry(state / REGISTRY_FILENAME, getattr(args, "hub_hostname", None))
    except (RegistryError, OSError) as error:
        raise CommandError(str(error).strip().splitlines()[0]) from None


class _LocalRegistry:
    """The edge's `devices.json`: the edge reads it at start, so restart a running edge after."""

    def __init__(self, path: Path, hostname: str | None) -> None:
        self.registry = DeviceRegistry.load(path)
        self.where = str(path)
        self.hostname = hostname or socket.gethostname()

    def ids(self) -> list[str]:
        return self.registry.ids()

    def exists(self, device_id: str) -> bool:
        return self.registry.get(device_id) is not None

    def create(self, device_id: str) -> DeviceIdentity:
        return self.registry.create(device_id)

    def remove(self, device_id: str) -> None:
        self.registry.remove(device_id)


class _IoTHubRegistry:
    """IoT Hub's identity registry; IoT Hub generates the keys (none is sent)."""

    def __init__(self) -> None:
        from turbofan_core.azure_settings import iothub_registry_manager, iothub_settings

        settings = iothub_settings()
        self.manager = iothub_registry_manager(settings.connection_string)
        self.where = f"IoT Hub {settings.hostname}"
        self.hostname = settings.hostname

    def ids(self) -> list[str]:
        return sorted(device.device_id for device in self.manager.get_devices())

    def exists(self, device_id: str) -> bool:
        try:
            self.manager.get_device(device_id)
        except IoTHubError as error:
            if error.status == 404:
                return False
            raise
        return True

    def create(self, device_id: str) -> DeviceIdentity:
        device = self.manager.create_device_with_sas(device_id, None, None, "enabled")
        keys = device.authentication.symmetric_key
        return DeviceIdentity(device.device_id, keys.primary_key, keys.secondary_key)

    def remove(self, device_id: str) -> None:
        self.manager.delete_device(device_id)
