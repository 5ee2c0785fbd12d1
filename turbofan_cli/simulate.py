"""`turbofan simulate`: replay C-MAPSS engines as devices, writing IoT Hub capture files, or posting
each message to the edge module (`--to edge`), which scores it and forwards it to its landing zone.

Secrets come only from the environment (AZURE_STORAGE_CONNECTION_STRING) or, for the edge, from
its device registry file, never from arguments, which other users can read in the process list,
and are never printed.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from edge_module.auth import REGISTRY_FILENAME, DeviceRegistry, RegistryError
from simulator.answers import Answers
from simulator.capture_writer import CaptureWriter
from simulator.edge_client import DEFAULT_HUB_HOSTNAME, DEFAULT_RETRY_SECONDS, EdgeClient, EdgeError
from simulator.iothub_sender import IoTHubError, IoTHubSender, device_fields
from simulator.replay import (
    ReplayInterrupted,
    ReplayStats,
    Transport,
    UnknownUnits,
    device_ids,
    planned_messages,
    replay,
    select_units,
)
from turbofan_cli import CommandError
from turbofan_core.azure_settings import SettingError, redact
from turbofan_core.cmapss import UNIT, read_cmapss
from turbofan_core.home import Home
from turbofan_core.storage import (
    CONNECTION_STRING_ENV,
    LANDING_CONTAINER_ENV,
    LocalStore,
    ObjectStore,
    blob_store_from_connection_string,
)

_UNIT_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")
# Flags of --to edge only: (attribute, flag).
_EDGE_FLAGS = (
    ("edge_url", "--edge-url"),
    ("edge_state", "--edge-state"),
    ("register", "--register"),
    ("hub_hostname", "--hub-hostname"),
)
# Flags of --to iothub only.
_IOTHUB_FLAGS = (("connection_strings", "--connection-strings"), ("ca_file", "--ca-file"))
DEVICE_CONNECTION_STRING_ENV = "IOTHUB_DEVICE_CONNECTION_STRING"
_NAMED_DEVICES = 8  # a longer list of missing devices is cut, so the error stays one readable line
_LIVE_DEVICES = 2  # devices nearest failure shown beside the progress bar
_LIVE_SECONDS = 0.5  # how often those are refreshed


def parse_units(text: str) -> list[int]:
    """`1-20` or `1,5,9-12` as a sorted list of unit numbers."""
    units: set[int] = set()
    for part in text.split(","):
        match = _UNIT_RANGE.fullmatch(part)
        first, last = (int(match[1]), int(match[2] or match[1])) if match else (0, -1)
        if first < 1 or last < first:
            raise argparse.ArgumentTypeError(f"{text!r} is not a unit list like 1-20 or 1,5,9-12")
        units.update(range(first, last + 1))
    return sorted(units)


def _argument(convert: Callable[[str], float], accept: Callable[[float], bool], what: str) -> Callable:
    """An argparse type: `convert`, then `accept`, or a one-line error saying what was expected."""

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):  # a comparison with nan is false: refused too
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


_positive = _argument(float, lambda value: value > 0, "a positive number")
_count = _argument(int, lambda value: value >= 1, "a whole number of at least 1")
_fraction = _argument(float, lambda value: 0 <= value < 1, "a fraction in [0, 1), like 0.05")
_seconds = _argument(float, lambda value: value >= 0, "a number of seconds, 0 or more")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", type=Path, required=True, help="a C-MAPSS file, e.g. train_FD001.txt")
    parser.add_argument("--units", type=parse_units, help="units to replay: 1-20 or 1,5,9-12 (default: all)")
    parser.add_argument(
        "--to",
        choices=("landing", "blob", "edge", "iothub"),
        default="landing",
        help="landing folder, Azure Blob container, the edge module (POST /telemetry per message), or "
        "IoT Hub's device protocol with azure-iot-device (a real hub, or the edge's gateway)",
    )
    parser.add_argument(
        "--container",
        help=f"blob container for --to blob (default: env {LANDING_CONTAINER_ENV}); "
        f"the connection string is read from env {CONNECTION_STRING_ENV}",
    )
    parser.add_argument(
        "--landing-dir", type=Path, help="landing folder for --to landing (default: $TURBOFAN_HOME/landing)"
    )
    parser.add_argument("--rate", type=_positive, help="cycles per second per device (default: no pause)")
    parser.add_argument(
        "--no-failure-events",
        action="store_true",
        help="no failure events (by default each unit of a train_ file ends with one, never a test file's)",
    )
    parser.add_argument("--hub", default="turbofan-hub", help="IoT hub name used in capture file names")
    parser.add_argument(
        "--engines-per-device",
        type=_count,
        default=1,
        metavar="K",
        help="units flown one after another per device, the engine replaced after each failure "
        "(default 1: unit 7 is Client_007; else devices Client_001... take K units each in order)",
    )
    parser.add_argument(
        "--duplicates",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="fraction of the messages delivered twice (same message id, later file), as IoT Hub's "
        "at-least-once delivery does (default 0)",
    )
    parser.add_argument(
        "--late",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="fraction of the capture files published after later ones, under their own name; with "
        "--to edge or iothub, of the messages sent after 1-3 later messages of their device (default 0)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random draws of --duplicates and --late (default 0)"
    )
    edge = parser.add_argument_group("--to edge")
    edge.add_argument("--edge-url", metavar="URL", help="the edge module, e.g. http://127.0.0.1:8080")
    edge.add_argument(
        "--edge-state",
        type=Path,
        metavar="DIR",
        help="the edge's state folder; its devices.json holds the device keys (default: $TURBOFAN_HOME/edge)",
    )
    edge.add_argument(
        "--register",
        action="store_true",
        help="create the devices missing from the registry; the edge reads its registry at start, so "
        "start (or restart) it after, unless it reloads its registry when it meets an unknown device",
    )
    edge.add_argument(
        "--hub-hostname",
        metavar="HOST",
        help=f"the IoT hub the SAS tokens name (default {DEFAULT_HUB_HOSTNAME})",
    )
    edge.add_argument(
        "--retry-seconds",
        type=_seconds,
        metavar="S",
        help="how long a message is resent (same id) while the edge is unreachable or answers 5xx, "
        "or, for --to iothub, waits for its acknowledgement while the SDK reconnects, before giving "
        f"up (default {DEFAULT_RETRY_SECONDS:g})",
    )
    iothub = parser.add_argument_group("--to iothub")
    iothub.add_argument(
        "--connection-strings",
        type=Path,
        metavar="FILE",
        help="a file of device connection strings, one per line, each device's DeviceId the replay's "
        f"(`turbofan devices create` prints them); default: env {DEVICE_CONNECTION_STRING_ENV}, one device",
    )
    iothub.add_argument(
        "--ca-file",
        type=Path,
        metavar="PEM",
        help="the CA that signed the gateway's certificate, when the strings name a GatewayHostName",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    _check_target_flags(args)
    frame = _read_frame(args.file)
    try:
        selected = select_units(frame, args.units)
    except UnknownUnits as error:
        raise CommandError(f"{args.file}: {error}") from None
    # Only run-to-failure (train) files end in a failure; a test unit stops while still healthy.
    failure_events = not args.no_failure_events and args.file.name.startswith("train_")
    if args.to == "edge":
        return _run_edge(args, selected, failure_events)
    if args.to == "iothub":
        return _run_iothub(args, selected, failure_events)
    connection_string = os.environ.get(CONNECTION_STRING_ENV, "")
    try:
        store = _open_store(args, connection_string)
        with CaptureWriter(store, hub=args.hub, late=args.late, seed=args.seed) as writer:
            stats, interrupted = _replay_with_progress(selected, writer, args, failure_events, store.location)
    except _storage_errors() as error:
        message = redact(_first_line(error), connection_string)
        raise CommandError(f"cannot write to the landing zone: {message}") from None
    print(_summary(stats, store.location, interrupted, delivery=bool(args.duplicates or args.late)))
    return 130 if interrupted else 0


def _check_target_flags(args: argparse.Namespace) -> None:
    """Refuse, before any work, flags that mean nothing for the chosen target."""
    for target, flags in (("edge", _EDGE_FLAGS), ("iothub", _IOTHUB_FLAGS)):
        given = [flag for name, flag in flags if getattr(args, name)]
        if given and args.to != target:
            raise CommandError(f"{', '.join(given)} only apply to --to {target}")
    if args.to not in ("edge", "iothub"):
        if args.retry_seconds is not None:
            raise CommandError("--retry-seconds only applies to --to edge and --to iothub")
        return
    if args.landing_dir or args.container:
        raise CommandError(
            f"--landing-dir and --container do not apply to --to {args.to}: the edge (or the hub's "
            "routing) writes the landing zone"
        )
    if args.to == "edge" and not args.edge_url:
        raise CommandError("--to edge needs --edge-url URL, e.g. http://127.0.0.1:8080")


def _run_edge(args: argparse.Namespace, selected: pd.DataFrame, failure_events: bool) -> int:
    """Replay into the edge module, showing its latest answers; the summary counts its answers."""
    state = args.edge_state or Home.from_env().root / "edge"
    units = sorted(selected[UNIT].unique().tolist())
    keys = _device_keys(state / REGISTRY_FILENAME, device_ids(units, args.engines_per_device), args.register)
    retry_seconds = DEFAULT_RETRY_SECONDS if args.retry_seconds is None else args.retry_seconds
    try:
        client = EdgeClient(
            args.edge_url,
            keys,
            args.hub_hostname or DEFAULT_HUB_HOSTNAME,
            retry_seconds,
            late=args.late,
            seed=args.seed,
        )
    except ValueError as error:
        raise CommandError(f"--edge-url: {error}") from None
    try:
        with client:
            stats, interrupted = _replay_with_progress(selected, client, args, failure_events, args.edge_url)
    except EdgeError as error:
        raise CommandError(str(error)) from None
    print(_edge_summary(stats, client.answers, client.retries, args.edge_url, interrupted, args))
    return 130 if interrupted else 0


def _device_keys(path: Path, devices: list[str], register: bool) -> dict[str, str]:
    """Each device's primary key from the edge's registry; missing devices are an error, or created."""
    try:
        registry = DeviceRegistry.load(path)
        missing = [device for device in devices if registry.get(device) is None]
        if missing and not register:
            raise CommandError(
                f"{len(missing)} devices are not in the edge's registry {path}: {_named(missing)}; "
                "create them with --register (then start the edge, unless it reloads its registry)"
            )
        for device in missing:
            registry.create(device)
    except (RegistryError, OSError) as error:  # messages name the file, never its keys
        raise CommandError(_first_line(error)) from None
    if missing:
        print(
            f"registered {len(missing)} devices in {path}; an edge already running knows them only "
            "once it reloads its registry (restart it if it answers 'unknown device')",
            file=sys.stderr,
        )
    return {device: registry.get(device).primary_key for device in devices}


def _named(devices: list[str]) -> str:
    """The first few device ids, so a long list stays one readable line."""
    named = ", ".join(devices[:_NAMED_DEVICES])
    if len(devices) > _NAMED_DEVICES:
        named += f" and {len(devices) - _NAMED_DEVICES} more"
    return named


def _run_iothub(args: argparse.Namespace, selected: pd.DataFrame, failure_events: bool) -> int:
    """Replay with azure-iot-device, each device from its own connection string."""
    strings = _device_connection_strings(args.connection_strings)
    devices = device_ids(sorted(selected[UNIT].unique().tolist()), args.engines_per_device)
    missing = [device for device in devices if device not in strings]
    if missing:
        raise CommandError(f"{len(missing)} devices have no connection string: {_named(missing)}")
    certificate = args.ca_file.read_text() if args.ca_file else None
    retry_seconds = DEFAULT_RETRY_SECONDS if args.retry_seconds is None else args.retry_seconds
    # The SDK logs every dropped connection from its threads; the progress bar says it instead.
    logging.getLogger("azure.iot.device").setLevel(logging.CRITICAL)
    first = device_fields(strings[devices[0]])
    where = first.get("GatewayHostName") or first["HostName"]
    sender = IoTHubSender(
        {device: strings[device] for device in devices},
        certificate,
        acknowledge_seconds=retry_seconds,
        late=args.late,
        seed=args.seed,
    )
    try:
        with sender:
            stats, interrupted = _replay_with_progress(selected, sender, args, failure_events, where)
    except IoTHubError as error:
        raise CommandError(redact(str(error), ";".join(strings.values()))) from None
    print(_edge_summary(stats, sender.answers, None, where, interrupted, args))
    return 130 if interrupted else 0


def _device_connection_strings(path: Path | None) -> dict[str, str]:
    """DeviceId -> connection string, from the file (one per line) or the environment (one device)."""
    if path is None:
        text = os.environ.get(DEVICE_CONNECTION_STRING_ENV, "")
        if not text.strip():
            raise CommandError(
                f"--to iothub needs --connection-strings FILE or env {DEVICE_CONNECTION_STRING_ENV}"
            )
        where = f"env {DEVICE_CONNECTION_STRING_ENV}"
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise CommandError(_first_line(error)) from None
        where = str(path)
    strings: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                strings[device_fields(line)["DeviceId"]] = line.strip()
            except ValueError as error:  # never echo the line: it holds a key
                raise CommandError(f"{where}, line {number}: {error}") from None
    return strings


def _read_frame(path: Path) -> pd.DataFrame:
    try:
        return read_cmapss(path)
    except FileNotFoundError:
        raise CommandError(f"no such file: {path}") from None
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot read {path} as a C-MAPSS file: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    """Library errors can span many lines (pandas, Azure); a user error is printed on one."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _open_store(args: argparse.Namespace, connection_string: str) -> ObjectStore:
    if args.to == "landing":
        if args.container:
            raise CommandError("--container only applies to --to blob")
        return LocalStore(args.landing_dir or Home.from_env().landing)
    if args.landing_dir:
        raise CommandError("--landing-dir only applies to --to landing")
    container = args.container or os.environ.get(LANDING_CONTAINER_ENV)
    if not container:
        raise CommandError(f"--to blob needs --container NAME or env {LANDING_CONTAINER_ENV}")
    if not connection_string:
        raise CommandError(f"--to blob needs the connection string in env {CONNECTION_STRING_ENV}")
    try:
        return blob_store_from_connection_string(connection_string, container)
    except SettingError as error:  # malformed, unreachable or refused: the message names the setting
        raise CommandError(str(error)) from None


def _storage_errors() -> tuple[type[Exception], ...]:
    """What a store raises when it cannot be reached or written; azure-core comes with azure-storage-blob."""
    from azure.core.exceptions import AzureError

    return (OSError, AzureError)


def _replay_with_progress(
    selected: pd.DataFrame, transport: Transport, args: argparse.Namespace, failure_events: bool, where: str
) -> tuple[ReplayStats, bool]:
    """Replay with a progress bar on stderr; return the stats and whether Ctrl-C stopped it."""
    units = selected[UNIT].nunique()
    devices = len(device_ids(selected[UNIT].unique().tolist(), args.engines_per_device))
    total = sum(planned_messages(len(selected), units, failure_events, args.duplicates))
    engines = f" ({units} engines)" if args.engines_per_device > 1 else ""
    started = f"replaying {devices} devices{engines}, {total} messages, from {args.file} to {where}"
    print(started, file=sys.stderr)
    with tqdm(total=total, desc=f"{devices} devices", unit="msg", file=sys.stderr, disable=None) as bar:
        live = _LiveAnswers(transport, bar) if isinstance(transport, (EdgeClient, IoTHubSender)) else None
        try:
            stats = replay(
                selected,
                transport,
                rate=args.rate,
                failure_events=failure_events,
                on_message=live.answered if live else lambda _record: bar.update(),
                engines_per_device=args.engines_per_device,
                duplicates=args.duplicates,
                seed=args.seed,
            )
        except ReplayInterrupted as stop:
            return stop.stats, True
    return stats, False


class _LiveAnswers:
    """The edge's answers beside the progress bar: the devices nearest failure by RUL, or a retry.

    Refreshed at most every `_LIVE_SECONDS`, in the bar's one line (tqdm cuts it to the terminal):
    a line per answer would scroll the terminal away at hundreds of messages a second.
    """

    def __init__(self, client: EdgeClient | IoTHubSender, bar: tqdm) -> None:
        self.answers = client.answers
        self.bar = bar
        self._next = 0.0
        if isinstance(client, EdgeClient):
            client.on_retry = self.retrying
        else:
            client.on_connection = self.connection

    def answered(self, _record: object) -> None:
        self.bar.update()
        now = time.monotonic()
        if now >= self._next:
            self._next = now + _LIVE_SECONDS
            self.bar.set_postfix_str(self._nearest_failure(), refresh=False)

    def retrying(self, failure: str, seconds_left: float) -> None:
        what = failure.partition(":")[0]  # the error's type or the HTTP status: the rest is too long here
        self.bar.set_postfix_str(f"edge unreachable ({what}); resending for {seconds_left:.0f} s more")
        self._next = 0.0  # the next answer replaces this at once

    def connection(self, device: str, connected: bool) -> None:
        """The SDK lost or regained a device's connection (it reconnects and resends by itself)."""
        if not connected:
            self.bar.set_postfix_str(f"{device} disconnected; azure-iot-device reconnects and resends")
            self._next = 0.0

    def _nearest_failure(self) -> str:
        nearest = self.answers.nearest_failure(_LIVE_DEVICES)
        if not nearest:
            return "answered unscored: the edge serves no model" if self.answers.unscored else ""
        return ", ".join(
            f"{device} c{a.cycle} RUL {a.p50:.0f} [{a.p10:.0f}-{a.p90:.0f}]" for device, a in nearest
        )


def _summary(stats: ReplayStats, where: str, interrupted: bool, delivery: bool) -> str:
    """The counts, one per line; duplicates and late files only when they were asked for."""
    lines = ["interrupted: every message sent until then is written, in whole files"] if interrupted else []
    lines += [
        f"devices:        {stats.devices}",
        f"messages:       {stats.messages}",
        f"failure events: {stats.failure_events}",
        f"files:          {stats.files}",
    ]
    if delivery:
        lines += [f"duplicates:     {stats.duplicates}", f"late files:     {stats.late_files}"]
    lines += [f"where:          {where}", f"seconds:        {stats.seconds:.2f}"]
    return "\n".join(lines)


def _edge_summary(
    stats: ReplayStats,
    answers: Answers,
    retries: int | None,
    where: str,
    interrupted: bool,
    args: argparse.Namespace,
) -> str:
    """The counts and the edge's answers, one per line; the commonest refusal reasons with the refusals;
    resent copies and late messages when `args` asked for them. `retries` is None where the client
    retries out of sight (azure-iot-device)."""
    lines = ["interrupted: every message sent until then was acknowledged"] if interrupted else []
    lines += [
        f"devices:        {stats.devices}",
        f"messages:       {stats.messages}",
        f"failure events: {stats.failure_events}",
    ]
    if args.duplicates:
        lines.append(f"resent copies:  {stats.duplicates}")
    if args.late:
        lines.append(f"late messages:  {stats.late_files}")
    refused = f"refused:        {answers.refused}"
    if answers.refusals:
        refused += " (" + "; ".join(f"{n} x {why}" for why, n in answers.refusals.most_common(3)) + ")"
    lines += [
        f"scored:         {answers.scored}",
        f"unscored:       {answers.unscored}",
        f"duplicates:     {answers.duplicates}",
        refused,
    ]
    if retries is not None:
        lines.append(f"retries:        {retries}")
    lines += [
        f"where:          {where}",
        f"seconds:        {stats.seconds:.2f}",
    ]
    return "\n".join(lines)
