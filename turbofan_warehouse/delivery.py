"""At-least-once delivery made exact: one copy per message, lifetimes by device order, not arrival.

A batch of valid messages (the table `batch_messages`, one row per message with its `idx`,
registered by the caller inside its transaction) is stored in these steps, all in SQL:

1. identity: a message's key is the md5 of its device and IoT Hub message id; without an id,
   of its content (telemetry: cycle and readings; failure event: cycle and enqueued time,
   since two engines of one device may fail at the same cycle);
2. verdict: a key already stored, or seen earlier in the batch, is a duplicate when the
   content is the same and a conflict (quarantined) when it is not. Of two copies the one
   enqueued first is kept, whatever order they arrive in. Only keys that repeat are looked
   at closely; finding them joins the batch's keys against the stored keys, one 16-byte
   column per stored message. Telemetry without an id repeats another only inside one
   lifetime, so it is judged after step 3;
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

from turbofan_core.telemetry import MEASUREMENTS

DUPLICATE, CONFLICT, BAD_TIME = "duplicate", "conflict", "bad_time"
# An incoming copy enqueued before the stored one replaces it, then is new; a stored copy it
# displaces with another body goes to the quarantine, as it would have had it arrived second.
_NEW, _EARLIER, _DISPLACES = "new", "earlier", "displaces"

_READINGS = ", ".join(MEASUREMENTS)
_ORDER = "t, CycleTime, is_failure, message_key"  # device order; the key only breaks exact ties
_CONTENT = f"if(is_failure, hash(true, CycleTime), hash(false, CycleTime, {_READINGS}))"
_WITH_KEY = "t IS NOT NULL AND (message_id IS NOT NULL OR is_failure)"  # judged in step 2


@dataclass(frozen=True)
class Outcome:
    """What the batch did: the rows not stored (idx -> DUPLICATE, CONFLICT or BAD_TIME), the stored
    rows a conflicting copy enqueued earlier displaced (source_file, position, device_id, message_id),
    and how many stored rows changed lifetime."""

    rejected: dict[int, str]
    displaced: list[tuple[str, int, str, str]]
    relabelled: int


def store_batch(conn: duckdb.DuckDBPyConnection) -> Outcome:
    """Store the new messages of `batch_messages`; the caller owns the transaction."""
    conn.execute(
        "CREATE TEMP TABLE incoming AS SELECT idx, device_id, message_id, is_failure, CycleTime, "
        "TRY_CAST(enqueued_time_utc AS TIMESTAMP_NS) AS t, md5_number(device_id || chr(0) || CASE "
        "WHEN message_id IS NOT NULL THEN 'id:' || message_id "
        "WHEN is_failure THEN 'failure:' || CycleTime || ':' || enqueued_time_utc "
        f"ELSE 'telemetry:' || concat_ws(':', CycleTime, {_READINGS}) END) AS message_key "
        "FROM batch_messages"
    )
    displaced = _judge(conn)
    relabelled = _number_lifetimes(conn)
    _judge_repeats_without_id(conn)
    for table, columns in (
        ("telemetry", f"b.device_id, n.lifetime, b.CycleTime, {_READINGS}, n.t, b.message_id, n.message_key"),
        ("failure_events", "b.device_id, n.lifetime, b.CycleTime, n.t, b.message_id, n.message_key"),
    ):
        kind = "n.is_failure" if table == "failure_events" else "NOT n.is_failure"
        conn.execute(
            f"INSERT INTO {table} SELECT {columns}, b.source_file, b.position FROM numbered n "
            f"JOIN batch_messages b USING (idx) WHERE n.source = 'new' AND {kind} "
            "AND idx NOT IN (SELECT idx FROM verdicts)"
        )
    rejected = dict(
        conn.execute(
            f"SELECT idx, '{BAD_TIME}' FROM incoming WHERE t IS NULL "
            "UNION ALL SELECT idx, verdict FROM verdicts"
        ).fetchall()
    )
    for table in ("incoming", "verdicts", "numbered"):
        conn.execute(f"DROP TABLE {table}")
    return Outcome(rejected, displaced, relabelled)


def _judge(conn: duckdb.DuckDBPyConnection) -> list[tuple[str, int, str, str]]:
    """`verdicts`: the rows of the batch that are not stored, with why. Of two copies the one enqueued
    first is kept: an earlier incoming copy replaces the stored one, which is returned if its body
    differs (to be quarantined)."""
    conn.execute(
        "CREATE TEMP TABLE keyed AS SELECT idx, message_key, t, CycleTime, is_failure FROM incoming "
        f"WHERE {_WITH_KEY}"
    )
    stored = (
        "SELECT message_key, {content} AS stored_content, (enqueued_time_utc, CycleTime) AS stored_at "
        "FROM {table} WHERE message_key IN (SELECT message_key FROM keyed)"
    )
    conn.execute(
        "CREATE TEMP TABLE stored AS "
        + stored.format(table="telemetry", content=f"hash(false, CycleTime, {_READINGS})")
        + " UNION ALL "
        + stored.format(table="failure_events", content="hash(true, CycleTime)")
    )
    copies = f"OVER (PARTITION BY message_key ORDER BY {_ORDER}, idx)"
    conn.execute(
        "CREATE TEMP TABLE verdicts AS WITH looked_at AS ("
        f"  SELECT k.*, c.content FROM keyed k JOIN (SELECT idx, {_CONTENT} AS content FROM batch_messages) c"
        "   USING (idx) WHERE message_key IN (SELECT message_key FROM stored) OR message_key IN ("
        "   SELECT message_key FROM keyed GROUP BY message_key HAVING count(*) > 1)"
        "), ranked AS ("
        f"  SELECT *, row_number() {copies} AS copy, first_value(content) {copies} AS first_content"
        "  FROM looked_at"
        ") SELECT idx, CASE"
        f"  WHEN stored_content <> content THEN if((t, CycleTime) < stored_at, '{_DISPLACES}', '{CONFLICT}')"
        f"  WHEN stored_content IS NOT NULL THEN if((t, CycleTime) < stored_at, '{_EARLIER}', '{DUPLICATE}')"
        f"  WHEN copy > 1 THEN if(first_content = content, '{DUPLICATE}', '{CONFLICT}')"
        f"  ELSE '{_NEW}' END AS verdict, message_key FROM ranked LEFT JOIN stored USING (message_key)"
    )
    # Keep the earliest copy whatever the arrival order: the stored later copy makes way.
    replaced = (
        f"message_key IN (SELECT message_key FROM verdicts WHERE verdict IN ('{_EARLIER}', '{_DISPLACES}'))"
    )
    displaced = conn.execute(
        "SELECT source_file, position, device_id, message_id FROM (SELECT * FROM telemetry WHERE "
        f"{replaced} UNION ALL BY NAME SELECT * FROM failure_events WHERE {replaced}) WHERE message_key IN "
        f"(SELECT message_key FROM verdicts WHERE verdict = '{_DISPLACES}') ORDER BY ALL"
    ).fetchall()
    for table in ("telemetry", "failure_events"):
        conn.execute(f"DELETE FROM {table} WHERE {replaced}")
    conn.execute(f"DELETE FROM verdicts WHERE verdict IN ('{_NEW}', '{_EARLIER}', '{_DISPLACES}')")
    conn.execute("ALTER TABLE verdicts DROP COLUMN message_key")
    for table in ("keyed", "stored"):
        conn.execute(f"DROP TABLE {table}")
    return displaced


def _judge_repeats_without_id(conn: duckdb.DuckDBPyConnection) -> None:
    """Telemetry without a message id repeats another only inside one lifetime (a new engine may well
    report the same cycle and readings), so it is judged once lifetimes are numbered. As in step 2,
    the copy enqueued first is kept: a stored later copy makes way for an earlier new one."""
    conn.execute(
        "CREATE TEMP TABLE without_id AS SELECT n.idx, n.message_key, n.lifetime, n.t, n.CycleTime, "
        "row_number() OVER (PARTITION BY n.message_key, n.lifetime ORDER BY n.t, n.CycleTime, n.idx) AS copy "
        "FROM numbered n JOIN incoming i USING (idx) "
        "WHERE n.source = 'new' AND i.message_id IS NULL AND NOT n.is_failure"
    )
    same = "s.message_key = r.message_key AND s.lifetime = r.lifetime"
    conn.execute(
        "DELETE FROM telemetry s WHERE EXISTS (SELECT 1 FROM without_id r WHERE r.copy = 1 AND "
        f"{same} AND (s.enqueued_time_utc, s.CycleTime) > (r.t, r.CycleTime))"
    )
    conn.execute(
        f"INSERT INTO verdicts SELECT idx, '{DUPLICATE}' FROM without_id r WHERE copy > 1 "
        f"OR EXISTS (SELECT 1 FROM telemetry s WHERE {same})"
    )
    conn.execute("DROP TABLE without_id")


def _number_lifetimes(conn: duckdb.DuckDBPyConnection) -> int:
    """Number the accepted rows' lifetimes (table `numbered`) and renumber the stored rows after each
    device's first new one. Returns how many stored rows changed lifetime.
    """
    conn.execute(
        "CREATE TEMP TABLE accepted AS SELECT * FROM incoming WHERE t IS NOT NULL "
        "AND idx NOT IN (SELECT idx FROM verdicts)"
    )
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
        f") SELECT source, rid, idx, {_ORDER}, base + sum(opens_run::INTEGER) OVER ("
        f"  PARTITION BY device_id ORDER BY {_ORDER} ROWS UNBOUNDED PRECEDING) - is_failure::INTEGER"
        "  AS lifetime FROM marked"
    )
    relabelled = 0
    for table in ("telemetry", "failure_events"):
        relabelled += conn.execute(
            f"UPDATE {table} SET lifetime = n.lifetime FROM numbered n "
            f"WHERE n.source = '{table}' AND {table}.rowid = n.rid AND {table}.lifetime <> n.lifetime"
        ).fetchone()[0]
    for table in ("accepted", "change_points", "device_events", "anchors"):
        conn.execute(f"DROP TABLE {table}")
    return relabelled
