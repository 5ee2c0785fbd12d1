"""The Dagster instance of the embedded default: `$TURBOFAN_HOME/dagster`, with its dagster.yaml.

Without a DAGSTER_HOME holding a dagster.yaml, `dagster dev` keeps its state in a temporary
folder deleted on exit (and reads the repository's `dagster.yaml`, a copy of DAGSTER_YAML).
Every asset that writes the warehouse holds the `warehouse` pool, limited here to one holder:
DuckDB takes one writing process at a time, however many runs are started.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from turbofan_core.home import Home

DAGSTER_YAML = """\
# Written by `turbofan`; edit freely, it is not overwritten. Keep the pool limit: DuckDB takes
# one writing process at a time, and every asset that writes the warehouse is in a pool.
concurrency:
  runs:
    max_concurrent_runs: 2  # sensor and UI runs queue; two at a time on a 2-core machine
  pools:
    default_limit: 1
telemetry:
  enabled: false
"""


def ensure_dagster_home(home: Home) -> Path:
    """Create the instance folder and its dagster.yaml if missing; point DAGSTER_HOME at it."""
    home.dagster.mkdir(parents=True, exist_ok=True)
    config = home.dagster / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    elif "default_limit: 1" not in config.read_text():
        print(
            f"warning: {config} sets no pool limit of 1; warehouse writers may collide. "
            "See docs/operations.md.",
            file=sys.stderr,
        )
    os.environ["DAGSTER_HOME"] = str(home.dagster)
    return home.dagster
