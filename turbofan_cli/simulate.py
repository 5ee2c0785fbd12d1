"""`turbofan simulate`: replay C-MAPSS engines as devices, writing IoT Hub capture files.

Secrets come only from the environment (AZURE_STORAGE_CONNECTION_STRING), never from
arguments, which other users can read in the process list, and are never printed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from simulator.capture_writer import CaptureWriter
from simulator.replay import ReplayInterrupted, ReplayStats, UnknownUnits, replay, select_units
from turbofan_cli import CommandError
from turbofan_core.cmapss import UNIT, read_cmapss
from turbofan_core.home import Home
from turbofan_core.storage import LocalStore, ObjectStore, blob_store_from_connection_string

CONNECTION_STRING_ENV = "AZURE_STORAGE_CONNECTION_STRING"
CONTAINER_ENV = "TURBOFAN_LANDING_CONTAINER"
_UNIT_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")
_SECRET_KEYS = ("AccountKey", "SharedAccessSignature")


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


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", type=Path, required=True, help="a C-MAPSS file, e.g. train_FD001.txt")
    parser.add_argument("--units", type=parse_units, help="units to replay: 1-20 or 1,5,9-12 (default: all)")
    parser.add_argument(
        "--to", choices=("landing", "blob"), default="landing", help="landing folder or Azure Blob container"
    )
    parser.add_argument(
        "--container",
        help=f"blob container for --to blob (default: env {CONTAINER_ENV}); "
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
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    frame = _read_frame(args.file)
    try:
        selected = select_units(frame, args.units)
    except UnknownUnits as error:
        raise CommandError(f"{args.file}: {error}") from None
    # Only run-to-failure (train) files end in a failure; a test unit stops while still healthy.
    failure_events = not args.no_failure_events and args.file.name.startswith("train_")
    connection_string = os.environ.get(CONNECTION_STRING_ENV, "")
    try:
        store = _open_store(args, connection_string)
        stats, interrupted = _replay_with_progress(selected, store, args, failure_events)
    except _storage_errors() as error:
        message = _redact(_first_line(error), connection_string)
        raise CommandError(f"cannot write to the landing zone: {message}") from None
    print(_summary(stats, store.location, interrupted, delivery=bool(args.duplicates or args.late)))
    return 130 if interrupted else 0


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
    container = args.container or os.environ.get(CONTAINER_ENV)
    if not container:
        raise CommandError(f"--to blob needs --container NAME or env {CONTAINER_ENV}")
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
    selected: pd.DataFrame, store: ObjectStore, args: argparse.Namespace, failure_events: bool
) -> tuple[ReplayStats, bool]:
    """Replay with a progress bar on stderr; return the stats and whether Ctrl-C stopped it."""
    units = selected[UNIT].nunique()
    devices = -(-units // args.engines_per_device)
    total = len(selected) + (units if failure_events else 0)
    total += round(args.duplicates * total)  # replay resends exactly this many
    engines = f" ({units} engines)" if args.engines_per_device > 1 else ""
    started = f"replaying {devices} devices{engines}, {total} messages, from {args.file} to {store.location}"
    print(started, file=sys.stderr)
    with (
        CaptureWriter(store, hub=args.hub, late=args.late, seed=args.seed) as writer,
        tqdm(total=total, desc=f"{devices} devices", unit="msg", file=sys.stderr, disable=None) as bar,
    ):
        try:
            stats = replay(
                selected,
                writer,
                rate=args.rate,
                failure_events=failure_events,
                on_message=lambda _r: bar.update(),
                engines_per_device=args.engines_per_device,
                duplicates=args.duplicates,
                seed=args.seed,
            )
        except ReplayInterrupted as stop:
            return stop.stats, True
    return stats, False


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
