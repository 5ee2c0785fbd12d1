"""Deployments: every manifest sent to an edge target, and what became of it.

`applied`: the target serves it (the local edge confirmed the model). `sent`: the target took it
and applies it on its own (IoT Hub, whose device's edgeAgent then runs it). `refused`: the
target's reason is kept. The deployment in service (`current`) is the last one applied or sent,
so a refusal leaves the previous one current.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb

APPLIED, SENT, REFUSED = "applied", "sent", "refused"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS deployments (
    deployed_at TIMESTAMP NOT NULL,
    manifest_sha256 VARCHAR NOT NULL,
    model_version INTEGER NOT NULL,
    target VARCHAR NOT NULL,
    result VARCHAR NOT NULL CHECK (result IN ('{APPLIED}', '{SENT}', '{REFUSED}')),
    reason VARCHAR,
    run_id VARCHAR
);
"""


@dataclass(frozen=True)
class Deployment:
    """One row of `deployments`; `deployed_at` is naive UTC, like the registry's times."""

    deployed_at: datetime
    manifest_sha256: str
    model_version: int
    target: str
    result: str
    reason: str | None
    run_id: str | None


def ensure_deployments(conn: duckdb.DuckDBPyConnection) -> None:
    """Create the table if missing; writers call it, readers (read-only connections) cannot."""
    conn.execute(SCHEMA)


def record(
    conn: duckdb.DuckDBPyConnection,
    manifest_sha256: str,
    model_version: int,
    target: str,
    result: str,
    reason: str | None,
    run_id: str | None,
) -> Deployment:
    """Append one deployment: `result` APPLIED or SENT, or REFUSED with its `reason`."""
    if result not in (APPLIED, SENT, REFUSED) or (result == REFUSED) != (reason is not None):
        raise ValueError(
            f"a deployment is applied, sent, or refused with a reason; got {result!r}, {reason!r}"
        )
    ensure_deployments(conn)
    deployment = Deployment(
        deployed_at=datetime.now(UTC).replace(tzinfo=None),
        manifest_sha256=manifest_sha256,
        model_version=model_version,
        target=target,
        result=result,
        reason=reason,
        run_id=run_id,
    )
    conn.execute(
        "INSERT INTO deployments VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            deployment.deployed_at,
            deployment.manifest_sha256,
            deployment.model_version,
            deployment.target,
            deployment.result,
            deployment.reason,
            deployment.run_id,
        ],
    )
    return deployment


def current(conn: duckdb.DuckDBPyConnection, target: str | None = None) -> Deployment | None:
    """The deployment in service: the last one applied or sent (to `target`, when given); None if
    none was."""
    where, args = ("AND target = ?", [target]) if target is not None else ("", [])
    row = conn.execute(
        f"SELECT * FROM deployments WHERE result IN ('{APPLIED}', '{SENT}') {where} "
        "ORDER BY deployed_at DESC, rowid DESC LIMIT 1",
        args,
    ).fetchone()
    return Deployment(*row) if row is not None else None
