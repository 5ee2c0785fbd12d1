"""At-least-once delivery made exact: one copy per message, lifetimes by device order, not arrival.

A batch of valid messages (the table `batch_messages`, registered by the caller inside its
transaction) is stored in these steps, all in SQL:

1. identity: a message's key is the md5 of its device and IoT Hub message id; without an id,
   of its content (telemetry: cycle and readings; failure event: cycle and enqueued time,
   since two engines of one device may fail at the same cycle);
2. verdict: a key already stored, or seen earlier in the batch, is a duplicate when the
   content is the same and a conflict (quarantined) when it is not; the lookup joins the
   batch's keys against the stored keys, so it reads one 16-byte column per stored message.
   Telemetry without an id repeats another only inside one lifetime, so it is judged after 3;
3. lifetimes: in device order (enqueued time, then CycleTime, telemetry before the failure
   event of the same cycle), a failure event closes the lifetime of what precedes it, and
   consecutive failure events (no telemetry between) close the same one, so a redelivered
   failure event never opens a phantom lifetime. Only a device's rows from its earliest new
   message on are renumbered, starting from the stored event just before it: in-order data
   renumbers nothing stored, a late file renumbers exactly the lifetimes it changes;
4. insert the new rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pandas as pd

from turbofan_core.telemetry import MEASUREMENTS

NEW, DUPLICATE, CONFLICT = "new", "duplicate", "conflict"

_READINGS = ", ".join(MEASUREMENTS)
_ORDER = "t, CycleTime, is_failure, message_key"  # device order; the key only breaks exact ties
_ID_LESS_TELEMETRY = "concat_ws(':', CycleTime, " + ", ".join(MEASUREMENTS) + ")"


@dataclass(frozen=True)
class Outcome:
    """What one batch did: counts per file, the records to quarantine, and stored rows renumbered."""

    per_file: pd.DataFrame  # source_file, telemetry, failure_events, duplicates
    quarantine: list[tuple[str, int, str]]  # (source_file, position, reason)
    relabelled: int


def store_batch(conn: duckdb.DuckDBPyConnection) -> Outcome:
    """Store the new messages of `batch_messages`; the caller owns the transaction."""
    _identify(conn)
    _judge(conn)
    relabelled = _number_lifetimes(conn)
    _drop_repeats_without_id(conn)
    numbered = "accepted JOIN numbered n ON n.source = 'new' AND n.idx = accepted.idx"
    conn.execute(
        f"INSERT INTO telemetry SELECT device_id, n.lifetime, CycleTime, {_READINGS}, t, message_id, "
        f"message_key, source_file, position FROM {numbered} WHERE NOT is_failure"
    )
    conn.execute(
        "INSERT INTO failure_events SELECT device_id, n.lifetime, CycleTime, t, message_id, message_key, "
        f"source_file, position FROM {numbered} WHERE is_failure"
    )
    per_file = conn.execute(
        f"SELECT source_file, count(*) FILTER (verdict = '{NEW}' AND NOT is_failure) AS telemetry, "
        f"count(*) FILTER (verdict = '{NEW}' AND is_failure) AS failure_events, "
        f"count(*) FILTER (verdict = '{DUPLICATE}') AS duplicates FROM verdicts GROUP BY source_file"
    ).df()
    quarantine = conn.execute(
        "SELECT source_file, position, 'EnqueuedTimeUtc ' || coalesce('''' || enqueued_time_utc || '''', "
        "'(none)') || ' is not an ISO 8601 UTC time' FROM incoming WHERE t IS NULL "
        "UNION ALL SELECT source_file, position, 'message id ' || coalesce('''' || message_id || '''', "
        "'(none)') || ' was already received from ' || device_id || ' with a different body' "
        f"FROM verdicts WHERE verdict = '{CONFLICT}' ORDER BY ALL"
    ).fetchall()
    conn.execute("DROP VIEW accepted")
    for table in ("incoming", "verdicts", "numbered"):
        conn.execute(f"DROP TABLE {table}")
    return Outcome(per_file, quarantine, relabelled)


def _identify(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(
        "CREATE TEMP TABLE incoming AS SELECT *, TRY_CAST(enqueued_time_utc AS TIMESTAMP_NS) AS t, "
        "md5_number(device_id || chr(0) || CASE WHEN message_id IS NOT NULL THEN 'id:' || message_id "
        "WHEN is_failure THEN 'failure:' || CycleTime || ':' || enqueued_time_utc "
        f"ELSE 'telemetry:' || {_ID_LESS_TELEMETRY} END) AS message_key, "
        # Compared within this transaction only, never stored: hash() may change across DuckDB versions.
        f"CASE WHEN is_failure THEN hash(true, CycleTime) ELSE hash(false, CycleTime, {_READINGS}) END "
        "AS content FROM batch_messages"
    )


def _judge(conn: duckdb.DuckDBPyConnection) -> None:
    first = f"OVER (PARTITION BY message_key ORDER BY {_ORDER}, source_file, position)"
    conn.execute(
        "CREATE TEMP TABLE verdicts AS WITH ranked AS ("
        f"  SELECT *, row_number() {first} AS copy, first_value(content) {first} AS first_content"
        "   FROM incoming WHERE t IS NOT NULL"
        "), stored AS ("
        f"  SELECT message_key, hash(false, CycleTime, {_READINGS}) AS stored_content FROM telemetry"
        "   WHERE message_key IN (SELECT message_key FROM ranked WHERE message_id IS NOT NULL OR is_failure)"
        "  UNION ALL SELECT message_key, hash(true, CycleTime) FROM failure_events"
        "   WHERE message_key IN (SELECT message_key FROM ranked WHERE message_id IS NOT NULL OR is_failure)"
        ") SELECT ranked.*, CASE"
        f"  WHEN stored_content IS NOT NULL THEN if(stored_content = content, '{DUPLICATE}', '{CONFLICT}')"
        f"  WHEN copy > 1 AND (message_id IS NOT NULL OR is_failure)"
        f"   THEN if(first_content = content, '{DUPLICATE}', '{CONFLICT}')"
        f"  ELSE '{NEW}' END AS verdict FROM ranked LEFT JOIN stored USING (message_key)"
    )


def _drop_repeats_without_id(conn: duckdb.DuckDBPyConnection) -> None:
    """Telemetry without a message id repeats another only inside one lifetime (a new engine may well
    report the same cycle and readings), so it is judged once lifetimes are numbered."""
    conn.execute(
        "CREATE TEMP TABLE repeats AS SELECT idx FROM ("
        "  SELECT accepted.idx, accepted.message_key, n.lifetime, row_number() OVER ("
        f"   PARTITION BY accepted.message_key, n.lifetime ORDER BY {_ORDER}, source_file, position) AS copy"
        "  FROM accepted JOIN numbered n ON n.source = 'new' AND n.idx = accepted.idx"
        "  WHERE message_id IS NULL AND NOT is_failure"
        ") r WHERE copy > 1 OR EXISTS ("
        "  SELECT 1 FROM telemetry t WHERE t.message_key = r.message_key AND t.lifetime = r.lifetime)"
    )
    conn.execute(f"UPDATE verdicts SET verdict = '{DUPLICATE}' WHERE idx IN (SELECT idx FROM repeats)")
    conn.execute("DROP TABLE repeats")


def _number_lifetimes(conn: duckdb.DuckDBPyConnection) -> int:
    """Number the accepted rows' lifetimes (table `numbered`) and renumber the stored rows after each
    device's first new one. Returns how many stored rows changed lifetime.
    """
    conn.execute(f"CREATE TEMP VIEW accepted AS SELECT * FROM verdicts WHERE verdict = '{NEW}'")
    conn.execute(
        "CREATE TEMP TABLE change_points AS "
        f"SELECT device_id, min(({_ORDER})) AS first_new FROM accepted GROUP BY device_id"
    )
    stored = (
        "SELECT '{table}' AS source, e.rowid AS rid, e.device_id, e.enqueued_time_utc AS t, e.CycleTime, "
        "{failure} AS is_failure, e.message_key, e.lifetime, c.first_new FROM {table} e "
        "JOIN change_points c USING (device_id)"
    )
    conn.execute(
        "CREATE TEMP TABLE device_events AS "
        + stored.format(table="telemetry", failure="false")
        + " UNION ALL "
        + stored.format(table="failure_events", failure="true")
    )
    # The stored event just before each device's first new one, and the lifetime that follows it.
    conn.execute(
        "CREATE TEMP TABLE anchors AS SELECT device_id, "
        f"arg_max(lifetime + if(is_failure, 1, 0), ({_ORDER})) AS base, "
        f"arg_max(is_failure, ({_ORDER})) AS after_failure FROM device_events "
        f"WHERE ({_ORDER}) < first_new GROUP BY device_id"
    )
    conn.execute(
        "CREATE TEMP TABLE numbered AS WITH sequence AS ("
        f"  SELECT source, rid, NULL::BIGINT AS idx, device_id, {_ORDER} FROM device_events"
        f"   WHERE ({_ORDER}) >= first_new"
        f"  UNION ALL SELECT 'new', NULL, idx, device_id, {_ORDER} FROM accepted"
        "), marked AS ("
        "  SELECT s.*, coalesce(a.base, 1) AS base, is_failure AND NOT coalesce("
        f"   lag(is_failure) OVER (PARTITION BY s.device_id ORDER BY {_ORDER}), a.after_failure, false)"
        "   AS opens_run FROM sequence s LEFT JOIN anchors a USING (device_id)"
        ") SELECT source, rid, idx, base + sum(opens_run::INTEGER) OVER ("
        f"  PARTITION BY device_id ORDER BY {_ORDER} ROWS UNBOUNDED PRECEDING) - is_failure::INTEGER"
        "  AS lifetime FROM marked"
    )
    relabelled = 0
    for table in ("telemetry", "failure_events"):
        relabelled += conn.execute(
            f"UPDATE {table} SET lifetime = n.lifetime FROM numbered n "
            f"WHERE n.source = '{table}' AND {table}.rowid = n.rid AND {table}.lifetime <> n.lifetime"
        ).fetchone()[0]
    for table in ("change_points", "device_events", "anchors"):
        conn.execute(f"DROP TABLE {table}")
    return relabelled
