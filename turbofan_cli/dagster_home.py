"""The Dagster instance of the embedded default: `$TURBOFAN_HOME/dagster`, with its dagster.yaml.

Without a DAGSTER_HOME holding a dagster.yaml, `dagster dev` keeps its state in a temporary
folder deleted on exit; runs are queued one at a time because DuckDB has one writer.
"""

from __future__ import annotations

import os
from pathlib import Path

from turbofan_core.home import Home

DAGSTER_YAML = """\
# Written by `turbofan`; edit freely, it is not overwritten.
concurrency:
  runs:
    max_concurrent_runs: 1  # DuckDB takes one writer at a time
telemetry:
  enabled: false
"""


def ensure_dagster_home(home: Home) -> Path:
    """Create the instance folder and its dagster.yaml if missing; point DAGSTER_HOME at it."""
    home.dagster.mkdir(parents=True, exist_ok=True)
    config = home.dagster / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(home.dagster)
    return home.dagster
