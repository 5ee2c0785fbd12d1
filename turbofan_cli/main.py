"""`turbofan`: the console entry point.

Each subcommand lives in its own module, imported only when that subcommand runs, so
`turbofan --help` is instant and an image without Dagster can still run the commands it has.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from turbofan_cli import CommandError


@dataclass(frozen=True)
class Subcommand:
    """A module with `configure(parser)`, which adds its arguments and sets `run(args) -> int`."""

    module: str
    help: str


# To add a subcommand: write its module, then register it here with one line.
SUBCOMMANDS: dict[str, Subcommand] = {
    "simulate": Subcommand("turbofan_cli.simulate", "replay C-MAPSS engines as devices into a landing zone"),
    "data": Subcommand("turbofan_cli.data", "import, download or locate the NASA C-MAPSS files"),
    "demo": Subcommand(
        "turbofan_cli.demo", "replay FD001 and materialise every asset, headless (embedded default)"
    ),
    "live": Subcommand(
        "turbofan_cli.live", "the whole system running: edge, Dagster with its sensors, simulator"
    ),
    "ui": Subcommand("turbofan_cli.ui", "open the Dagster UI on the embedded default's instance"),
    "models": Subcommand("turbofan_cli.models", "the model registry: list models, or show one's metrics"),
    "edge": Subcommand("turbofan_cli.edge", "the IoT Edge module: serve scoring and store-and-forward"),
    "devices": Subcommand("turbofan_cli.devices", "device identities and keys, in the edge or IoT Hub"),
}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr with exit code 2, like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """Every subcommand is listed; only the one named in `argv` is imported and configured."""
    parser = _Parser(prog="turbofan", description="Turbofan predictive maintenance, end to end.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, subcommand in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=subcommand.help, description=subcommand.help)
        if name == chosen:
            importlib.import_module(subcommand.module).configure(subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `turbofan` with `argv` (default: the process arguments) and return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = build_parser(argv).parse_args(argv)
        except SystemExit as exit_:  # --help, or a usage error already printed
            return int(exit_.code or 0)
        return args.run(args)
    except CommandError as error:
        print(f"turbofan: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("turbofan: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
