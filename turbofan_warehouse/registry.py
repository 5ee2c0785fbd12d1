"""The model registry: every trained model, what it saw, how it scored, and why it is (not) in service.

A model enters as a `candidate`. The promotion gate then judges it once (`gate` is
`promoted` or `refused`, and `reason` says why); a promoted model becomes the one
`champion` and the previous champion is `archived`, keeping the reason it was promoted
for. Every stage change is also appended to `model_stage_events`, with its reason.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb
import pandas as pd

from turbofan_warehouse.schema import has_table, transaction

CANDIDATE, CHAMPION, ARCHIVED = "candidate", "champion", "archived"
PROMOTED, REFUSED = "promoted", "refused"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS model_registry (
    version INTEGER PRIMARY KEY,
    registered_at TIMESTAMP NOT NULL,
    run_id VARCHAR,
    bundle_sha256 VARCHAR NOT NULL,
    bundle_location VARCHAR NOT NULL,
    params VARCHAR NOT NULL,
    feature_spec VARCHAR NOT NULL,
    rul_cap INTEGER NOT NULL,
    cv_folds INTEGER NOT NULL,
    cv_seed INTEGER NOT NULL,
    cv_rmse DOUBLE NOT NULL,
    cv_rmse_std DOUBLE NOT NULL,
    cv_mae DOUBLE NOT NULL,
    baseline_cv_rmse DOUBLE NOT NULL,
    data_watermark VARCHAR NOT NULL,
    data_sha256 VARCHAR NOT NULL,
    test_rmse DOUBLE,
    test_mae DOUBLE,
    test_phm08 DOUBLE,
    test_coverage_p10_p90 DOUBLE,
    stage VARCHAR NOT NULL CHECK (stage IN ('{CANDIDATE}', '{CHAMPION}', '{ARCHIVED}')),
    gate VARCHAR CHECK (gate IN ('{PROMOTED}', '{REFUSED}')),
    reason VARCHAR,
    stage_changed_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS model_stage_events (
    version INTEGER NOT NULL,
    changed_at TIMESTAMP NOT NULL,
    stage VARCHAR NOT NULL,
    reason VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS model_evaluations (
    version INTEGER NOT NULL,
    evaluated_at TIMESTAMP NOT NULL,
    run_id VARCHAR,
    engines INTEGER NOT NULL,
    rmse DOUBLE NOT NULL,
    mae DOUBLE NOT NULL,
    phm08 DOUBLE NOT NULL,
    coverage_p10_p90 DOUBLE NOT NULL,
    rmse_uncapped DOUBLE NOT NULL,
    phm08_uncapped DOUBLE NOT NULL,
    coverage_p10_p90_uncapped DOUBLE NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluation_errors (
    version INTEGER NOT NULL,
    device_id VARCHAR NOT NULL,
    last_cycle INTEGER NOT NULL,
    true_rul INTEGER NOT NULL,
    true_rul_capped INTEGER NOT NULL,
    predicted DOUBLE NOT NULL,
    p10 DOUBLE NOT NULL,
    p90 DOUBLE NOT NULL,
    error DOUBLE NOT NULL,
    in_interval BOOLEAN NOT NULL,
    phm08 DOUBLE NOT NULL,
    regime INTEGER,             -- the operating regime of the engine's last cycle
    rul_band VARCHAR            -- where its capped true RUL lies, e.g. 25-49
);
-- Registries made before evaluations were split by regime and RUL band: their rows keep NULLs.
ALTER TABLE evaluation_errors ADD COLUMN IF NOT EXISTS regime INTEGER;
ALTER TABLE evaluation_errors ADD COLUMN IF NOT EXISTS rul_band VARCHAR;
"""


@dataclass(frozen=True)
class Registration:
    """What training knows about a new model: the registry row minus stage, gate and test figures."""

    run_id: str | None
    bundle_sha256: str
    bundle_location: str
    params: dict[str, Any]
    feature_spec: dict[str, Any]
    rul_cap: int
    cv_folds: int
    cv_seed: int
    cv_rmse: float
    cv_rmse_std: float
    cv_mae: float
    baseline_cv_rmse: float
    data_watermark: dict[str, Any]
    data_sha256: str


@dataclass(frozen=True)
class ModelRecord(Registration):
    """One registry row, with the JSON columns decoded."""

    version: int
    registered_at: datetime
    test_rmse: float | None
    test_mae: float | None
    test_phm08: float | None
    test_coverage_p10_p90: float | None
    stage: str
    gate: str | None
    reason: str | None
    stage_changed_at: datetime


_JSON_FIELDS = ("params", "feature_spec", "data_watermark")


def ensure_registry(conn: duckdb.DuckDBPyConnection) -> None:
    """Create the tables if missing; the writers call it, readers (read-only connections) cannot."""
    conn.execute(SCHEMA)


def exists(conn: duckdb.DuckDBPyConnection) -> bool:
    """Whether any model was ever registered in this warehouse (works on a read-only connection)."""
    return (
        has_table(conn, "model_registry")
        and conn.execute("SELECT count(*) FROM model_registry").fetchone()[0] > 0
    )


def _records(conn: duckdb.DuckDBPyConnection, where: str, args: list[Any]) -> list[ModelRecord]:
    cursor = conn.execute(f"SELECT * FROM model_registry {where}", args)
    names = [column[0] for column in cursor.description]
    records = []
    for row in cursor.fetchall():
        values = dict(zip(names, row, strict=True))
        values.update({name: json.loads(values[name]) for name in _JSON_FIELDS})
        records.append(ModelRecord(**values))
    return records


def _one(conn: duckdb.DuckDBPyConnection, where: str, args: list[Any]) -> ModelRecord | None:
    found = _records(conn, where, args)
    return found[0] if found else None


def _insert(conn: duckdb.DuckDBPyConnection, table: str, row: dict[str, Any]) -> None:
    columns = ", ".join(row)
    conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(row))})", list(row.values()))


def register_candidate(conn: duckdb.DuckDBPyConnection, model: Registration) -> int:
    """Add a new candidate and return its version (one more than the highest so far)."""
    ensure_registry(conn)
    row = {k: json.dumps(v, sort_keys=True) if k in _JSON_FIELDS else v for k, v in asdict(model).items()}
    with transaction(conn):
        version = conn.execute("SELECT coalesce(max(version), 0) + 1 FROM model_registry").fetchone()[0]
        now = _utc_now()
        _insert(
            conn,
            "model_registry",
            {"version": version, "registered_at": now, **row, "stage": CANDIDATE, "stage_changed_at": now},
        )
        _event(conn, version, CANDIDATE, "registered by training")
    return version


def _utc_now() -> datetime:
    """Registry times are naive UTC, whatever the time zone of the process or the DuckDB session."""
    return datetime.now(UTC).replace(tzinfo=None)


def _event(conn: duckdb.DuckDBPyConnection, version: int, stage: str, reason: str) -> None:
    _insert(
        conn,
        "model_stage_events",
        {"version": version, "changed_at": _utc_now(), "stage": stage, "reason": reason},
    )


def latest(conn: duckdb.DuckDBPyConnection) -> ModelRecord | None:
    """The most recently registered model."""
    return _one(conn, "ORDER BY version DESC LIMIT 1", [])


def champion(conn: duckdb.DuckDBPyConnection) -> ModelRecord | None:
    return _one(conn, "WHERE stage = ?", [CHAMPION])


def get(conn: duckdb.DuckDBPyConnection, version: int) -> ModelRecord | None:
    return _one(conn, "WHERE version = ?", [version])


def promote(conn: duckdb.DuckDBPyConnection, version: int, reason: str) -> None:
    """Make `version` the champion and archive the previous one, atomically."""
    with transaction(conn):
        previous = champion(conn)
        if previous is not None:
            conn.execute(
                "UPDATE model_registry SET stage = ?, stage_changed_at = ? WHERE version = ?",
                [ARCHIVED, _utc_now(), previous.version],
            )
            _event(conn, previous.version, ARCHIVED, f"replaced by version {version}")
        conn.execute(
            "UPDATE model_registry SET stage = ?, gate = ?, reason = ?, stage_changed_at = ? "
            "WHERE version = ?",
            [CHAMPION, PROMOTED, reason, _utc_now(), version],
        )
        _event(conn, version, CHAMPION, reason)


def refuse(conn: duckdb.DuckDBPyConnection, version: int, reason: str) -> None:
    """Record that the gate refused `version`; it stays a candidate, with the reason."""
    conn.execute(
        "UPDATE model_registry SET gate = ?, reason = ? WHERE version = ?", [REFUSED, reason, version]
    )
    _event(conn, version, CANDIDATE, f"refused: {reason}")


def record_evaluation(
    conn: duckdb.DuckDBPyConnection,
    version: int,
    run_id: str | None,
    summary: dict[str, float],
    errors: pd.DataFrame,
) -> None:
    """Store a test-fleet evaluation (replacing one of the same version) and copy its headline figures."""
    ensure_registry(conn)
    with transaction(conn):
        conn.execute("DELETE FROM model_evaluations WHERE version = ?", [version])
        conn.execute("DELETE FROM evaluation_errors WHERE version = ?", [version])
        _insert(
            conn,
            "model_evaluations",
            {"version": version, "evaluated_at": _utc_now(), "run_id": run_id, **summary},
        )
        conn.register("new_errors", errors.assign(version=version))
        conn.execute("INSERT INTO evaluation_errors BY NAME SELECT * FROM new_errors")
        conn.unregister("new_errors")
        conn.execute(
            "UPDATE model_registry SET test_rmse = ?, test_mae = ?, test_phm08 = ?, "
            "test_coverage_p10_p90 = ? WHERE version = ?",
            [summary["rmse"], summary["mae"], summary["phm08"], summary["coverage_p10_p90"], version],
        )


def history(conn: duckdb.DuckDBPyConnection, version: int) -> list[tuple[datetime, str, str]]:
    """Every stage change of one model, oldest first: (when, stage, reason)."""
    return conn.execute(
        "SELECT changed_at, stage, reason FROM model_stage_events WHERE version = ? "
        "ORDER BY changed_at, rowid",
        [version],
    ).fetchall()


LIST_COLUMNS = (
    "version",
    "registered_at",
    "stage",
    "gate",
    "cv_rmse",
    "baseline_cv_rmse",
    "test_rmse",
    "test_phm08",
    "test_coverage_p10_p90",
    "bundle_sha256",
    "reason",
)


def table(conn: duckdb.DuckDBPyConnection, limit: int | None = None) -> pd.DataFrame:
    """The registry, newest first, with the columns people compare models by."""
    query = f"SELECT {', '.join(LIST_COLUMNS)} FROM model_registry ORDER BY version DESC"
    return conn.execute(query + (f" LIMIT {int(limit)}" if limit else "")).df()
