"""Read-only snapshots of the warehouse, so that no reader ever holds the writer's file.

DuckDB lets one process write a file, and a process that has the file open (even read-only)
makes the writer's next connection fail. So the writer publishes a copy after each of its
connections (checkpointed, copied to a temporary name, renamed into place), and readers (the
`turbofan` command, asset checks, notebooks) open the copy: they see the warehouse as of the
last published write and never block a pipeline run. A reader that keeps the copy open
keeps reading the version it opened; the next publish replaces the name, not its file.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb


class NoSnapshot(FileNotFoundError):
    """Nothing has been written to the warehouse yet."""


def snapshot_path(warehouse: Path) -> Path:
    return warehouse.with_name(f"{warehouse.stem}.snapshot{warehouse.suffix}")


def publish(conn: duckdb.DuckDBPyConnection, warehouse: Path) -> Path:
    """Copy the warehouse, as committed on `conn` (the only writer), to its snapshot atomically."""
    conn.execute("CHECKPOINT")  # fold the write-ahead log into the file, so the file alone is whole
    target = snapshot_path(warehouse)
    staging = target.with_name(f".{target.name}.tmp")
    with warehouse.open("rb") as source, staging.open("wb") as copy:
        shutil.copyfileobj(source, copy, length=16 << 20)
        copy.flush()
        os.fsync(copy.fileno())
    os.replace(staging, target)
    return target


@contextmanager
def read_snapshot(warehouse: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to the last published snapshot of `warehouse`."""
    path = snapshot_path(warehouse)
    if not path.exists():
        raise NoSnapshot(f"no warehouse snapshot at {path}: nothing has been ingested yet")
    conn = duckdb.connect(str(path), read_only=True)
    try:
        yield conn
    finally:
        conn.close()
