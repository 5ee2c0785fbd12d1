"""`turbofan simulate`: replay C-MAPSS engines as devices, writing IoT Hub capture files, or posting
each message to the edge module (`--to edge`), which scores it and forwards it to its landing zone.

Secrets come only from the environment (AZURE_STORAGE_CONNECTION_STRING) or, for the edge, from
its device registry file, never from arguments, which other users can read in the process list,
and are never printed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from edge_module.auth import REGISTRY_FILENAME, DeviceRegistry, RegistryError
from simulator.capture_writer import CaptureWriter
from simulator.edge_client import DEFAULT_HUB_HOSTNAME, DEFAULT_RETRY_SECONDS, EdgeClient, EdgeError
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
_SECRET_KEYS = ("AccountKey", "SharedAccessSignature")
# Flags of --to edge only: (attribute, flag).
_EDGE_FLAGS = (
    ("edge_url", "--edge-url"),
    ("edge_state", "--edge-state"),
    ("register", "--register"),
    ("hub_hostname", "--hub-hostname"),
    ("retry_seconds", "--retry-seconds"),
)
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
        choices=("landing", "blob", "edge"),
        default="landing",
        help="landing folder, Azure Blob container, or the edge module (POST /telemetry per message)",
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
        help="fraction of the capture files published after later ones, under their own name (default 0)",
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
        f"before giving up (default {DEFAULT_RETRY_SECONDS:g})",
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
    connection_string = os.environ.get(CONNECTION_STRING_ENV, "")
    try:
        store = _open_store(args, connection_string)
        with CaptureWriter(store, hub=args.hub, late=args.late, seed=args.seed) as writer:
            stats, interrupted = _replay_with_progress(selected, writer, args, failure_events, store.location)
    except _storage_errors() as error:
        message = _redact(_first_line(error), connection_string)
        raise CommandError(f"cannot write to the landing zone: {message}") from None
    print(_summary(stats, store.location, interrupted, delivery=bool(args.duplicates or args.late)))
    return 130 if interrupted else 0


def _check_target_flags(args: argparse.Namespace) -> None:
    """Refuse, before any work, flags that mean nothing for the chosen target."""
    if args.to != "edge":
        given = [flag for name, flag in _EDGE_FLAGS if getattr(args, name)]
        if given:
            raise CommandError(f"{', '.join(given)} only apply to --to edge")
        return
    if args.late:
        raise CommandError(
            "--late publishes capture files late, which has no meaning for --to edge: "
            "the edge answers each message as it is sent"
        )
    if args.landing_dir or args.container:
        raise CommandError(
            "--landing-dir and --container do not apply to --to edge: the edge forwards to its landing zone"
        )
    if not args.edge_url:
        raise CommandError("--to edge needs --edge-url URL, e.g. http://127.0.0.1:8080")


def _run_edge(args: argparse.Namespace, selected: pd.DataFrame, failure_events: bool) -> int:
    """Replay into the edge module, showing its latest answers; the summary counts its answers."""
    state = args.edge_state or Home.from_env().root / "edge"
    units = sorted(selected[UNIT].unique().tolist())
    keys = _device_keys(state / REGISTRY_FILENAME, device_ids(units, args.engines_per_device), args.register)
    retry_seconds = DEFAULT_RETRY_SECONDS if args.retry_seconds is None else args.retry_seconds
    try:
        client = EdgeClient(args.edge_url, keys, args.hub_hostname or DEFAULT_HUB_HOSTNAME, retry_seconds)
    except ValueError as error:
        raise CommandError(f"--edge-url: {error}") from None
    try:
        with client:
            stats, interrupted = _replay_with_progress(selected, client, args, failure_events, args.edge_url)
    except EdgeError as error:
        raise CommandError(str(error)) from None
    print(_edge_summary(stats, client, args.edge_url, interrupted, resent=bool(args.duplicates)))
    return 130 if interrupted else 0


def _device_keys(path: Path, devices: list[str], register: bool) -> dict[str, str]:
    """Each device's primary key from the edge's registry; missing devices are an error, or created."""
    try:
        registry = DeviceRegistry.load(path)
        missing = [device for device in devices if registry.get(device) is None]
        if missing and not register:
            named = ", ".join(missing[:_NAMED_DEVICES])
            if len(missing) > _NAMED_DEVICES:
                named += f" and {len(missing) - _NAMED_DEVICES} more"
            raise CommandError(
                f"{len(missing)} devices are not in the edge's registry {path}: {named}; "
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
    except ValueError:
        raise CommandError(f"env {CONNECTION_STRING_ENV} is not a valid connection string") from None


def _storage_errors() -> tuple[type[Exception], ...]:
    """What a store raises when it cannot be reached or written; azure-core comes with azure-storage-blob."""
    from azure.core.exceptions import AzureError

    return (OSError, AzureError)


def _redact(text: str, connection_string: str) -> str:
    """`text` without the account key or SAS of `connection_string`: error messages get printed."""
    for part in connection_string.split(";"):
        key, _, value = part.partition("=")
        if key.strip() in _SECRET_KEYS and value:
            text = text.replace(value, "***")
    return re.sub(r"sig=[^&\s]+", "sig=***", text)


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
        live = _LiveAnswers(transport, bar) if isinstance(transport, EdgeClient) else None
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

    def __init__(self, client: EdgeClient, bar: tqdm) -> None:
        self.client = client
        self.bar = bar
        self._next = 0.0
        client.on_retry = self.retrying

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

    def _nearest_failure(self) -> str:
        scored = [(device, a) for device, a in self.client.latest.items() if a.p50 is not None]
        if not scored:
            return "answered unscored: the edge serves no model" if self.client.unscored else ""
        nearest = sorted(scored, key=lambda item: item[1].p50)[:_LIVE_DEVICES]
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


def _edge_summary(stats: ReplayStats, client: EdgeClient, where: str, interrupted: bool, resent: bool) -> str:
    """The counts and the edge's answers, one per line; the commonest refusal reasons with the refusals."""
    lines = ["interrupted: every message sent until then was answered by the edge"] if interrupted else []
    lines += [
        f"devices:        {stats.devices}",
        f"messages:       {stats.messages}",
        f"failure events: {stats.failure_events}",
    ]
    if resent:
        lines.append(f"resent copies:  {stats.duplicates}")
    refused = f"refused:        {client.refused}"
    if client.refusals:
        refused += " (" + "; ".join(f"{n} x {why}" for why, n in client.refusals.most_common(3)) + ")"
    lines += [
        f"scored:         {client.scored}",
        f"unscored:       {client.unscored}",
        f"duplicates:     {client.duplicates}",
        refused,
        f"retries:        {client.retries}",
        f"where:          {where}",
        f"seconds:        {stats.seconds:.2f}",
    ]
    return "\n".join(lines)
