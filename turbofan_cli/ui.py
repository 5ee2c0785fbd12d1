"""`turbofan ui`: the Dagster UI on the embedded default's instance (lineage, runs, asset checks)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from turbofan_cli import CommandError
from turbofan_cli.dagster_home import ensure_dagster_home
from turbofan_core.home import Home


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    dagster = shutil.which("dagster", path=os.path.dirname(sys.executable)) or shutil.which("dagster")
    if dagster is None:
        raise CommandError("the `dagster` command is not installed here (run `make install`)")
    dagster_home = ensure_dagster_home(Home.from_env())
    print(f"Dagster instance: {dagster_home}; UI at http://{args.host}:{args.port}", flush=True)
    command = [dagster, "dev", "-m", "turbofan_assets.definitions", "-h", args.host, "-p", str(args.port)]
    os.execv(dagster, command)
    return 0  # not reached: execv replaces this process
